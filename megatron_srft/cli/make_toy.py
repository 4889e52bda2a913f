"""``srft make-toy``: write the CPU toy task (char tokenizer, tiny Qwen2 config, problems)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..experiments.toy import ToySettings, make_toy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ToySettings()
    parser.add_argument("--out", required=True, help="Output directory (model/, train.jsonl, test.jsonl).")
    parser.add_argument("--seed", type=int, default=d.seed, help="Seed for problems and model init.")
    parser.add_argument("--num-train", type=int, default=d.num_train, help="Training problems (with demos).")
    parser.add_argument("--num-test", type=int, default=d.num_test, help="Held-out problems.")
    parser.add_argument("--max-ops", type=int, default=d.max_ops,
                        help="Difficulty: problems have 2..max_ops operations.")
    parser.add_argument("--max-operand", type=int, default=d.max_operand,
                        help="Difficulty: operands are 1..max_operand (9 = single digits).")
    parser.add_argument("--max-value", type=int, default=d.max_value,
                        help="Every intermediate result v satisfies 0 <= v < max_value.")
    parser.add_argument("--num-layers", type=int, default=d.num_layers, help="Transformer layers of the toy model.")
    parser.add_argument("--num-ood-test", type=int, default=d.num_ood_test,
                        help="Also write test_ood.jsonl with this many out-of-distribution problems (0 = none).")
    parser.add_argument("--ood-min-ops", type=int, default=None,
                        help="Operations of the OOD problems, at least (default max_ops + 1).")
    parser.add_argument("--ood-max-ops", type=int, default=None,
                        help="Operations of the OOD problems, at most (default ood_min_ops + 1).")
    parser.add_argument("--held-out-plus-min", type=int, default=d.held_out_plus_min,
                        help="Hold additions of operands >= this out of every split but test_held_out.jsonl "
                        "(the study's out-of-distribution split; default: none held out).")
    parser.add_argument("--num-held-out-test", type=int, default=d.num_held_out_test,
                        help="Problems of test_held_out.jsonl (needs --held-out-plus-min).")
    parser.add_argument("--demo-error-rate", type=float, default=d.demo_error_rate,
                        help="Fraction of training demonstrations with one arithmetic slip (wrong final answer).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --out.")


def main(args) -> int:
    if args.max_ops < 2:
        raise UserError(f"--max-ops: expected >= 2, got {args.max_ops}")
    if args.max_value < 10:
        raise UserError(f"--max-value: expected >= 10, got {args.max_value}")
    if not 1 <= args.max_operand < args.max_value:
        raise UserError(f"--max-operand: expected 1 <= max_operand < max_value, got {args.max_operand}")
    if args.num_train < 1 or args.num_test < 1:
        raise UserError("--num-train/--num-test: expected >= 1")
    settings = ToySettings(seed=args.seed, num_train=args.num_train, num_test=args.num_test, max_ops=args.max_ops,
                           max_value=args.max_value, max_operand=args.max_operand, num_layers=args.num_layers,
                           num_ood_test=args.num_ood_test, ood_min_ops=args.ood_min_ops,
                           ood_max_ops=args.ood_max_ops, demo_error_rate=args.demo_error_rate,
                           held_out_plus_min=args.held_out_plus_min, num_held_out_test=args.num_held_out_test)
    try:
        settings.check()
        out = make_toy(args.out, settings, overwrite=args.overwrite)
    except ValueError as e:
        raise UserError(str(e)) from None
    ood = f", test_ood.jsonl ({settings.num_ood_test})" if settings.num_ood_test else ""
    if settings.num_held_out_test:
        ood += f", test_held_out.jsonl ({settings.num_held_out_test})"
    print(f"wrote {out}: model/, train.jsonl ({settings.num_train}), test.jsonl ({settings.num_test}){ood}")
    return 0
