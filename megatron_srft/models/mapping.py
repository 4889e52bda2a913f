"""Hugging Face <-> Megatron ``GPTModel`` weight mapping: the rule table of each family (``families.py``) applied.

The same table serves checkpoint conversion (``srft convert``), loading an HF directory straight into a
model at any TP/PP layout, exporting weights to the rollout engine (vLLM takes HF names) and scoring.

Each :class:`~megatron_srft.models.families.Rule` names a Megatron parameter (local-spec name, and the
Transformer Engine spec name where it differs), the HF tensors it is made of, the transform between them and how tensor parallelism splits it:

``copy``   the same tensor on both sides.
``vocab``  embedding / output rows: HF has ``vocab_size`` rows, Megatron ``padded_vocab`` rows (zero rows
           appended; trimmed again on export). TP splits rows contiguously (vocab-parallel).
``qkv``    HF ``q, k, v`` -> Megatron's fused ``linear_qkv``, stored per query group g (ng groups,
           nq = heads / ng query heads per group, hd = head_dim):
           ``[q_g (nq*hd rows); k_g (hd rows); v_g (hd rows)]`` for g = 0 .. ng-1. The same for the biases.
           Groups are contiguous, so TP splits rows contiguously (each rank gets ng / tp whole groups).
``fc1``    HF ``gate, up`` -> ``linear_fc1 = [gate; up]``. TP rank r holds ``[gate_r; up_r]`` (each half
           split separately), which is not a contiguous slice of the full tensor.

Layer names use ``{i}``: global layer number in HF names and in the full (TP=1, PP=1) Megatron view; a
pipeline stage's modules number their layers locally from 0, and ``TransformerLayer.layer_number - 1`` is the
global number.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from ..distributed import collectives
from ..errors import CheckpointError, ConfigError
from .arch import ArchSpec
from .builder import unwrap
from .families import EMBED, FAMILIES, IGNORED_HF_SUFFIXES, Rule


def rules_for(arch: ArchSpec) -> list[Rule]:
    """The rules that apply to this architecture (optional ones filtered by ``when``)."""
    if arch.family not in FAMILIES:
        raise ConfigError(f"model family {arch.family!r} has no weight mapping; supported: {', '.join(FAMILIES)}")
    out = []
    for r in FAMILIES[arch.family].rules:
        if r.when == "untied":
            if arch.tie_word_embeddings:
                continue
        elif r.when is not None and not getattr(arch, r.when):
            continue
        out.append(r)
    return out


def expanded(arch: ArchSpec) -> list[tuple[Rule, Optional[int]]]:
    """(rule, global layer or None) in export order: embedding, layer 0 rules, layer 1 rules, ..., norm, output."""
    rules = rules_for(arch)
    first_layer_rule = next(n for n, r in enumerate(rules) if r.per_layer)
    out = [(r, None) for r in rules[:first_layer_rule] if not r.per_layer]  # the table lists the embedding first
    for i in range(arch.num_layers):
        out += [(r, i) for r in rules if r.per_layer]
    out += [(r, None) for r in rules[first_layer_rule:] if not r.per_layer]
    return out


def hf_names(rule: Rule, layer: Optional[int]) -> list[str]:
    return [n.format(i=layer) for n in rule.hf]


def mcore_name(rule: Rule, layer: Optional[int], te: bool = False) -> str:
    return (rule.te if te and rule.te else rule.mcore).format(i=layer)


# ----------------------------------------------------------------------------------------- pure transforms


def to_mcore(rule: Rule, arch: ArchSpec, hf_tensors: list[torch.Tensor], padded_vocab: int) -> torch.Tensor:
    """HF tensors (in ``rule.hf`` order) -> the full (TP=1) Megatron tensor."""
    if rule.kind == "copy":
        return hf_tensors[0]
    if rule.kind == "vocab":
        t = hf_tensors[0]
        if t.shape[0] != arch.vocab_size:  # never pad or trim real rows away silently
            raise ConfigError(f"config.json: vocab_size={arch.vocab_size} but {rule.hf[0]} has {t.shape[0]} rows; "
                              f"set vocab_size to {t.shape[0]}")
        if t.shape[0] == padded_vocab:
            return t
        pad = t.new_zeros((padded_vocab - t.shape[0], *t.shape[1:]))
        return torch.cat([t, pad], dim=0)
    if rule.kind == "qkv":
        q, k, v = hf_tensors
        ng = arch.num_query_groups
        # [ng, rows_per_group, *rest]: per group [q heads of the group; k; v]
        return torch.cat([q.reshape(ng, -1, *q.shape[1:]), k.reshape(ng, -1, *k.shape[1:]),
                          v.reshape(ng, -1, *v.shape[1:])], dim=1).reshape(-1, *q.shape[1:])
    if rule.kind == "fc1":
        return torch.cat(hf_tensors, dim=0)
    raise AssertionError(rule.kind)


def to_hf(rule: Rule, arch: ArchSpec, full: torch.Tensor) -> list[torch.Tensor]:
    """The full (TP=1) Megatron tensor -> HF tensors in ``rule.hf`` order (views where possible)."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "vocab":
        return [full[: arch.vocab_size]]
    if rule.kind == "qkv":
        ng, hd = arch.num_query_groups, arch.head_dim
        q_rows = arch.num_attention_heads // ng * hd
        g = full.reshape(ng, q_rows + 2 * hd, *full.shape[1:])
        q, k, v = torch.split(g, [q_rows, hd, hd], dim=1)
        return [t.reshape(-1, *full.shape[1:]) for t in (q, k, v)]
    if rule.kind == "fc1":
        return list(torch.chunk(full, 2, dim=0))
    raise AssertionError(rule.kind)


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor."""
    if rule.tp_dim is None or tp_size == 1:
        return full
    if rule.kind == "fc1":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=rule.tp_dim)[tp_rank]


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` given every TP rank's slice in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)


# ----------------------------------------------------------------------------------------- streaming HF -> mcore


def _hf_index(arch: ArchSpec) -> dict[str, tuple[Rule, Optional[int]]]:
    return {n: (r, layer) for r, layer in expanded(arch) for n in hf_names(r, layer)}


def _unknown_tensor_error(arch: ArchSpec, name: str) -> ConfigError:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= arch.num_layers:
        return ConfigError(f"weights: tensor {name!r} is in layer {m.group(1)} but config.json has "
                           f"num_hidden_layers={arch.num_layers}")
    return ConfigError(f"weights: unexpected tensor {name!r} for a {arch.architecture} model")


def _convert_stream(arch: ArchSpec, items: Iterable[tuple[str, torch.Tensor]], padded_vocab: int,
                    expected: Optional[set] = None) -> Iterator[tuple[Rule, Optional[int], torch.Tensor]]:
    """Group HF tensors into rules as they arrive; yield (rule, layer, full mcore tensor) when complete.

    Only the parts of incomplete rules are buffered (at most a layer's q/k/v or gate/up pair when the shards
    are ordered by layer). ``expected``: the HF names that must all arrive (None = every mapped name).
    """
    index = _hf_index(arch)
    expected = set(index) if expected is None else set(expected)
    pending: dict[tuple[int, Optional[int]], dict[str, torch.Tensor]] = {}
    rule_ids = {id(r): n for n, r in enumerate(rules_for(arch))}
    for name, tensor in items:
        if name not in index:
            if name.endswith(IGNORED_HF_SUFFIXES) or (name == "lm_head.weight" and arch.tie_word_embeddings):
                continue
            raise _unknown_tensor_error(arch, name)
        rule, layer = index[name]
        names = hf_names(rule, layer)
        parts = pending.setdefault((rule_ids[id(rule)], layer), {})
        parts[name] = tensor
        expected.discard(name)
        if len(parts) == len(names):
            del pending[(rule_ids[id(rule)], layer)]
            yield rule, layer, to_mcore(rule, arch, [parts[n] for n in names], padded_vocab)
    missing = sorted(expected)
    if missing:
        raise ConfigError(f"weights: missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                          f"does config.json (num_hidden_layers={arch.num_layers}) match the weights?")


def check_hf_names(arch: ArchSpec, names: Iterable[str]) -> None:
    """Check an HF checkpoint's tensor names against the config before reading any tensor (same errors as
    the conversion: an unexpected tensor, e.g. a layer beyond num_hidden_layers, or a missing one)."""
    index = _hf_index(arch)
    seen = set()
    for name in names:
        if name not in index:
            if name.endswith(IGNORED_HF_SUFFIXES) or (name == "lm_head.weight" and arch.tie_word_embeddings):
                continue
            raise _unknown_tensor_error(arch, name)
        seen.add(name)
    missing = sorted(set(index) - seen)
    if missing:
        raise ConfigError(f"weights: missing tensor {missing[0]!r} ({len(missing)} missing in all); "
                          f"does config.json (num_hidden_layers={arch.num_layers}) match the weights?")


# ----------------------------------------------------------------------------------------- HF safetensors reader

#: A weight beyond this magnitude is not a trained value but damage (a flipped exponent bit gives ~1e37); the
#: largest weights of the supported families are orders of magnitude smaller.
MAX_ABS_WEIGHT = 1e5


def check_weight_values(name: str, tensor: torch.Tensor, source) -> torch.Tensor:
    """``tensor`` unchanged when every value is finite and ``|w| <= MAX_ABS_WEIGHT``; else a one-line error naming
    the tensor (a NaN/inf from a diverged run, or a flipped byte in a shard)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return tensor
    amax = float(tensor.detach().abs().max())
    if not math.isfinite(amax) or amax > MAX_ABS_WEIGHT:
        what = "non-finite values (NaN/inf)" if not math.isfinite(amax) else f"a value of magnitude {amax:.3g}"
        raise CheckpointError(f"{source}: tensor {name!r} holds {what}, beyond any trained weight (bound "
                              f"{MAX_ABS_WEIGHT:g}): the file is damaged, or the run that wrote it diverged")
    return tensor


class HFWeights:
    """The safetensors of an HF directory (``model.safetensors`` or sharded with an index), read tensor by tensor."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / self.INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{index}: expected JSON with a 'weight_map' object") from None
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise ConfigError(f"{index}: shard file {fname!r} named in the index is missing")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.dir / self.SINGLE).is_file():
            with safe_open(str(self.dir / self.SINGLE), framework="pt") as f:
                self.weight_map = {k: self.SINGLE for k in f.keys()}
        else:
            raise ConfigError(f"{self.dir}: no {self.SINGLE} or {self.INDEX} (expected HF safetensors weights)")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def iter_tensors(self, wanted: Optional[set] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) file by file (each file opened once); ``wanted`` filters names before reading."""
        by_file: dict[str, list[str]] = {}
        for name, fname in self.weight_map.items():
            if wanted is None or name in wanted:
                by_file.setdefault(fname, []).append(name)
        for fname in sorted(by_file):
            with safe_open(str(self.dir / fname), framework="pt") as f:
                for name in by_file[fname]:
                    yield name, check_weight_values(name, f.get_tensor(name), self.dir / fname)


# ----------------------------------------------------------------------------------------- model-side helpers


def _layer_numbers(model) -> list[int]:
    """Global layer numbers (0-based) of this stage's ``decoder.layers``, in local order."""
    return [layer.layer_number - 1 for layer in model.decoder.layers]


def _stage_rules(model, arch: ArchSpec) -> list[tuple[Rule, Optional[int], str]]:
    """(rule, global layer, this module's parameter name) for every parameter this stage holds."""
    params = dict(model.named_parameters())
    out = []
    local_of = {g: n for n, g in enumerate(_layer_numbers(model))}
    for rule, layer in expanded(arch):
        if layer is not None:
            if layer not in local_of:
                continue
            local = local_of[layer]
        else:
            local = None
        for te in (False, True):
            name = mcore_name(rule, local, te=te)
            if name in params:
                out.append((rule, layer, name))
                break
    return out


def _tied_output_param(model, arch: ArchSpec):
    """On a last stage without the embedding, the tied output weight is a separate copy to fill."""
    if arch.tie_word_embeddings and getattr(model, "post_process", False) and not getattr(model, "pre_process", True):
        return model.output_layer.weight
    return None


@torch.no_grad()
def load_hf_into_model(chunks: list, arch: ArchSpec, hf_dir: str | Path, groups) -> None:
    """Fill this rank's model chunks from an HF directory: each rank reads only the tensors its stage needs.

    Args:
        chunks: this rank's model chunks (GPTModel, possibly DDP / Float16Module wrapped), built for ``arch``.
        hf_dir: HF directory with safetensors weights.
        groups: :class:`~megatron_srft.distributed.groups.ParallelGroups` (tp_rank / tp_size select the TP shard).
    """
    weights = HFWeights(hf_dir)
    for chunk in chunks:
        model = unwrap(chunk)
        params = dict(model.named_parameters())
        padded_vocab = model.vocab_size  # GPTModel's (padded) embedding rows
        targets = {(rule.mcore, layer): name for rule, layer, name in _stage_rules(model, arch)}
        tied_out = _tied_output_param(model, arch)
        wanted = {n for r, layer in expanded(arch) if (r.mcore, layer) in targets for n in hf_names(r, layer)}
        if tied_out is not None:
            wanted.add(EMBED.hf[0])
        stream = _convert_stream(arch, weights.iter_tensors(wanted), padded_vocab, expected=wanted)
        filled = set()
        for rule, layer, full in stream:
            local = shard(rule, full, groups.tp_rank, groups.tp_size)
            dests = []
            if (rule.mcore, layer) in targets:
                dests.append((targets[(rule.mcore, layer)], params[targets[(rule.mcore, layer)]]))
            if tied_out is not None and rule is EMBED:
                dests.append(("output_layer.weight", tied_out))
            for pname, p in dests:
                if tuple(p.shape) != tuple(local.shape):
                    names = ", ".join(hf_names(rule, layer))
                    raise ConfigError(f"weights: tensor {names} has shape {tuple(full.shape)} (full), which does "
                                      f"not fit {pname} {tuple(p.shape)} at TP={groups.tp_size}; does config.json "
                                      f"match the weights?")
                p.copy_(local)
            filled.add((rule.mcore, layer))
        unfilled = sorted(targets[k] for k in set(targets) - filled)
        if unfilled:
            raise ConfigError(f"{hf_dir}: no weights for model parameter {unfilled[0]!r}")


_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's value as a plain tensor of its nominal dtype.

    With ``model.fp8_param`` Transformer Engine stores parameters as quantized tensor subclasses (FP8 data + a
    scale) that report their nominal dtype (bf16) but hold FP8 bytes. Consumers (vLLM, safetensors, the all-gather
    below) need real values: such a tensor exports ``t.dequantize()``. Plain tensors pass through unchanged.
    """
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and callable(getattr(t, "dequantize", None)):
        return t.dequantize()
    return t


@torch.no_grad()
def export_hf_weights(chunks: list, arch: ArchSpec, groups) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model on EVERY rank (call it on all ranks, in lockstep).

    The owning pipeline stage gathers the TP shards (all_gather over ``groups.tp_group``), then broadcasts the
    full Megatron tensor over ``groups.pp_group``; every rank converts it to HF tensors (vocab padding trimmed).
    At most one full tensor (plus its shards) is alive per step: consume each yielded tensor before the next.
    Tied models yield no ``lm_head.weight`` (HF ties it to ``model.embed_tokens.weight``). Tensors keep the
    parameters' dtypes: the consumer casts (the weight sync to the engine's dtype, the HF export to the run's).
    """
    owned: dict[tuple[str, Optional[int]], torch.Tensor] = {}
    for chunk in chunks:
        model = unwrap(chunk)
        params = dict(model.named_parameters())
        for rule, layer, name in _stage_rules(model, arch):
            owned[(rule.mcore, layer)] = params[name]
    keys = list(owned)
    if groups.pp_size > 1:
        all_keys = collectives.all_gather_object(keys, groups.pp_group)
        owner = {k: stage for stage, ks in enumerate(all_keys) for k in ks}
    else:
        owner = {k: 0 for k in keys}
    device = groups.device
    for rule, layer in expanded(arch):
        key = (rule.mcore, layer)
        if key not in owner:
            raise ConfigError(f"model: no pipeline stage holds {mcore_name(rule, layer)}")
        full = None
        if key in owned:
            local = _plain_tensor(owned[key].detach())
            if rule.tp_dim is not None and groups.tp_size > 1:
                shards = collectives.all_gather(local, groups.tp_group)
                full = unshard(rule, shards)
                del shards
            else:
                full = local
        if groups.pp_size > 1:
            src = collectives.global_rank(groups.pp_group, owner[key])
            meta = torch.zeros(4, dtype=torch.int64, device=device)
            if full is not None:
                meta[0] = _DTYPE_CODES.index(full.dtype)
                meta[1] = full.dim()
                meta[2: 2 + full.dim()] = torch.tensor(full.shape)
            meta = collectives.broadcast(meta, src, groups.pp_group)
            if full is None:
                shape = [int(s) for s in meta[2: 2 + int(meta[1])]]
                full = torch.empty(shape, dtype=_DTYPE_CODES[int(meta[0])], device=device)
            else:
                full = full.contiguous()
            full = collectives.broadcast(full, src, groups.pp_group)
        yield from zip(hf_names(rule, layer), to_hf(rule, arch, full))
        del full
