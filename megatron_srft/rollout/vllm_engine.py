"""The rollout engine: vLLM's ``LLM`` colocated in the training process.

One engine per rank (CPU, and GPU at rollout TP = 1) or per rollout-TP group (GPU, vLLM's
``external_launcher``: the ranks of a TP group each run one shard of the same engine, in the trainer's own
processes). Nothing here runs a second process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core
in-process, so a weight update is a function call that reads the trainer's tensors directly (no IPC, no
serialisation), and ``collective_rpc`` reaches the one local worker.

Log-probs. vLLM returns, per generated token, the log-prob of the sampled token under a distribution chosen
by ``logprobs_mode``. We use ``raw_logprobs``: ``log_softmax(logits)`` of the model itself, before
temperature, top-p or any logits processor. That is the policy the trainer scores (``log pi_theta(y_t)`` at
temperature 1), so ``engine_logprob - trainer_logprob`` measures only the numerical mismatch between the two
implementations, which is what :mod:`.mismatch` monitors and what truncated importance sampling corrects.
``processed_logprobs`` (after temperature / top-p) would be the true behaviour distribution of the sampler,
but comparing it with the trainer mixes the sampling transform into the mismatch; at temperature 1 and
top_p 1 (SRFT's rollout setting) the two modes coincide.

GPU memory dance (see docs/rollout.md): the engine is built with ``enable_sleep_mode=True``; during training
it sleeps at level 1 (weights offloaded to host, KV cache dropped); before a weight update it wakes the
weights only (``wake_up(tags=["weights"])``), receives the new weights, and only then re-allocates the KV
cache (``wake_up(tags=["kv_cache"])``), so the KV cache never coexists with the weight-sync buffers.
On CPU vLLM ignores sleep/wake (nothing to free), and these calls are no-ops.
"""

from __future__ import annotations

import contextlib

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import UserError
from ..config import ConfigError, RolloutConfig

#: our dtype names -> vLLM's
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

#: The CPU attention kernel supports these head sizes (16 is rejected at start-up with an obscure error).
_MIN_CPU_HEAD_DIM = 32


@dataclass
class Completion:
    """One sampled continuation.

    token_ids: [T] generated token ids (stop token included when the model emitted it).
    logprobs: [T] log-prob of each generated token under the raw policy (``raw_logprobs``, temperature 1).
    finish_reason: "stop" (EOS / stop token / stop string) or "length" (hit max_tokens / max_model_len).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


def resolve_dtype(rollout_dtype: str, params_dtype: str) -> str:
    """``rollout.dtype`` with ``auto`` resolved: the model's params dtype on GPU, fp32 on CPU (exact tests and
    vLLM's CPU kernels are fastest and exact in fp32)."""
    if rollout_dtype != "auto":
        return rollout_dtype
    return params_dtype if torch.cuda.is_available() else "fp32"


def engine_settings(cfg, model_dir: str) -> dict:
    """The engine's dtype, seed and max_model_len from an SRFTConfig, with ``auto`` / null resolved:
    dtype via :func:`resolve_dtype`; max_model_len null = data.max_prompt_length + data.max_response_length,
    capped by the model's max_position_embeddings."""
    from ..models.arch import load_arch

    r = cfg.rollout
    max_len = r.max_model_len or min(cfg.data.max_prompt_length + cfg.data.max_response_length,
                                     load_arch(model_dir).max_position_embeddings)
    return {"dtype": resolve_dtype(r.dtype, cfg.model.params_dtype), "seed": r.seed, "max_model_len": max_len}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:300]


def _refresh_tied_output_layer(worker) -> bool:
    """Re-pack a tied output layer after an in-place reload (runs on the vLLM worker; CPU only).

    vLLM's CPU backend packs every linear weight, the LM head included, into a kernel-specific copy when
    weights are processed. With tied embeddings no tensor named for the LM head arrives in a reload, so the
    in-place reload leaves its packed copy holding the OLD embedding (the shared weight itself is updated).
    Re-running the layer's weight processing re-packs it from the updated shared weight. GPU kernels read the
    weight directly, so this is not needed there.
    """
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    method = getattr(lm_head, "quant_method", None)
    if lm_head is None or method is None or not getattr(config, "tie_word_embeddings", False):
        return False
    method.process_weights_after_loading(lm_head)
    return True


@contextlib.contextmanager
def _keep_default_process_group():
    """vLLM's EngineCore.shutdown ends with ``torch.distributed.destroy_process_group()`` on the default group.
    Colocated, that group is the trainer's world and must outlive the engine (the demo and `make reproduce-toy`
    run several trainings in one process); vLLM's own sub-groups are still destroyed."""
    import torch.distributed as tdist

    original = tdist.destroy_process_group

    def destroy_unless_default(group=None):
        if group is not None:
            original(group)

    tdist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        tdist.destroy_process_group = original


class RolloutEngine:
    """vLLM in the training process. See the module docstring for the design.

    Args:
        cfg: the ``rollout`` config section (TP size, memory, KV cache size, sleep).
        model_dir: HF directory (config.json + tokenizer; weights unless ``load_format="dummy"``).
        dtype: "fp32" | "bf16" | "fp16" (or vLLM's spelling); CPU rollouts for exactness use fp32.
        seed: engine seed (sampling seeds are passed per call).
        max_model_len: prompt + response tokens the engine must hold.
        load_format: "auto" reads the weights in ``model_dir``; "dummy" starts with random weights to be
            replaced by :meth:`update_weights` (no weight files needed: start from a Megatron checkpoint).
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, dtype: str, seed: int, max_model_len: int,
                 load_format: str = "auto"):
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.max_model_len = int(max_model_len)
        self.on_gpu = torch.cuda.is_available()
        self._asleep = False
        self.llm = None
        self._check_settings(dtype, load_format)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (read at LLM build)
        if not self.on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gib)
        kwargs = dict(
            model=self.model_dir,
            dtype=_VLLM_DTYPES[dtype],
            seed=seed,
            max_model_len=self.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend=self._executor_backend(),
            logprobs_mode="raw_logprobs",
            max_logprobs=0,  # only the sampled token's log-prob is ever requested
            load_format=load_format,
            enforce_eager=cfg.enforce_eager or not self.on_gpu,  # CPU: torch.compile only slows start-up
            disable_log_stats=True,
        )
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_sleep_mode=cfg.sleep_between_steps)
        start = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM's start-up errors are long multi-line traces: keep the cause, one line
            raise UserError(f"rollout engine failed to start for {self.model_dir}: {_first_line(e)}") from e
        self.startup_seconds = time.perf_counter() - start
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    @classmethod
    def from_config(cls, cfg, model_dir: str, *, load_format: str = "auto") -> "RolloutEngine":
        """Build from the whole :class:`~megatron_srft.config.SRFTConfig` (see :func:`engine_settings`)."""
        return cls(cfg.rollout, model_dir, load_format=load_format, **engine_settings(cfg, model_dir))

    # ------------------------------------------------------------------------------------------ set-up

    def _check_settings(self, dtype: str, load_format: str) -> None:
        cfg_path = Path(self.model_dir) / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: not found (the rollout engine needs a Hugging Face config.json)")
        if dtype not in _VLLM_DTYPES:
            raise ConfigError(f"rollout.dtype: expected one of fp32, bf16, fp16, got {dtype!r}")
        if load_format not in ("auto", "dummy", "safetensors"):
            raise ConfigError(f"rollout engine load_format: expected auto | dummy | safetensors, got {load_format!r}")
        if self.max_model_len < 2:
            raise ConfigError(f"rollout.max_model_len: expected >= 2, got {self.max_model_len}")
        from ..models.arch import load_arch

        arch = load_arch(self.model_dir)
        if self.max_model_len > arch.max_position_embeddings:
            raise ConfigError(f"rollout.max_model_len: {self.max_model_len} exceeds the model's "
                              f"max_position_embeddings ({arch.max_position_embeddings}) in {cfg_path}")
        if not self.on_gpu and arch.head_dim < _MIN_CPU_HEAD_DIM:
            raise ConfigError(f"{cfg_path}: head_dim {arch.head_dim} is not supported by vLLM's CPU attention "
                              f"kernel; expected >= {_MIN_CPU_HEAD_DIM}")
        tp = self.cfg.tensor_parallel_size
        if tp > 1:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            if world % tp:
                raise ConfigError(f"rollout.tensor_parallel_size: {tp} does not divide the world size ({world})")
            if arch.num_query_groups % tp:
                raise ConfigError(f"rollout.tensor_parallel_size: {tp} does not divide num_key_value_heads "
                                  f"({arch.num_query_groups})")

    def _executor_backend(self) -> str:
        """"uni": one engine per process (any world size). "external_launcher": several trainer processes
        (already started by torchrun) form one vLLM TP group; vLLM builds its groups on top of the world."""
        return "external_launcher" if self.cfg.tensor_parallel_size > 1 else "uni"

    def _require_llm(self):
        if self.llm is None:
            raise UserError("rollout engine: used after close()")
        if self._asleep:
            raise UserError("rollout engine: generate() while asleep; call wake_up() first")
        return self.llm

    # ------------------------------------------------------------------------------------------ sampling

    def check_prompts(self, prompt_token_ids: list[list[int]], max_tokens: int) -> None:
        """One-line errors for prompts vLLM would reject (or silently cut) instead of a deep engine trace."""
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise UserError("rollout generate: expected a non-empty list of prompts (lists of token ids)")
        for i, p in enumerate(prompt_token_ids):
            if len(p) == 0:
                raise UserError(f"rollout generate: prompt {i} is empty")
            if len(p) >= self.max_model_len:
                raise UserError(f"rollout generate: prompt {i} has {len(p)} tokens; the engine's max_model_len is "
                                f"{self.max_model_len} (room for at least one response token is needed)")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise UserError(f"rollout generate: prompt {i} has token id {hi if hi >= self.vocab_size else lo} "
                                f"outside the vocabulary [0, {self.vocab_size})")
        if max_tokens < 1:
            raise UserError(f"rollout generate: max_tokens must be >= 1, got {max_tokens}")

    def generate(self, prompt_token_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 16, stop_token_ids: Optional[list[int]] = None,
                 seed: Optional[int] = None) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt. Returns [num_prompts][n] :class:`Completion`.

        Seeds: prompt i's samples use seed ``seed + i * n + j`` (j = sample index, vLLM adds j itself), so
        every sample in a call has its own stream and a call is reproducible. ``temperature=0`` is greedy.
        A response stops at ``max_tokens`` or when the prompt plus response reach ``max_model_len``.
        """
        llm = self._require_llm()
        if n < 1:
            raise UserError(f"rollout generate: n must be >= 1, got {n}")
        if temperature < 0:
            raise UserError(f"rollout generate: temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise UserError(f"rollout generate: top_p must be in (0, 1], got {top_p}")
        if temperature == 0 and n > 1:
            raise UserError(f"rollout generate: greedy sampling (temperature 0) gives one sample; got n={n}")
        self.check_prompts(prompt_token_ids, max_tokens)
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        params = []
        for i, p in enumerate(prompt_token_ids):
            room = self.max_model_len - len(p)
            params.append(SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                stop_token_ids=list(stop_token_ids or []), seed=None if seed is None else seed + i * n,
                logprobs=0, detokenize=False,
            ))
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_token_ids]
        try:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        except (ValueError, TypeError, VLLMValidationError) as e:
            raise UserError(f"rollout generate: {_first_line(e)}") from e
        result = []
        for out in outputs:
            samples = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, comp.logprobs or [])]
                if len(lps) != len(ids):
                    raise RuntimeError(f"rollout generate: vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
                samples.append(Completion(token_ids=ids, logprobs=lps, finish_reason=str(comp.finish_reason)))
            result.append(samples)
        return result

    # ------------------------------------------------------------------------------------------ weights

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights, given as ``(hf_name, full tensor)`` pairs covering the whole model.

        The iterable is consumed lazily, inside vLLM's in-place reload: each of vLLM's layers is re-processed
        (e.g. the CPU backend's weight repacking) as soon as all of its tensors have arrived, so the caller can
        stream from a generator and hold only the tensors in flight. All prefix-cache entries computed with
        the old weights are dropped afterwards. Returns the number of tensors consumed.
        """
        llm = self._require_llm_for_update()
        count = 0

        def counted():
            nonlocal count
            for name, tensor in weights:
                count += 1
                yield name, tensor

        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        if not self.on_gpu:
            llm.collective_rpc(_refresh_tied_output_layer)
        llm.reset_prefix_cache()
        return count

    def _require_llm_for_update(self):
        if self.llm is None:
            raise UserError("rollout engine: used after close()")
        return self.llm

    # ------------------------------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Free GPU memory for training: level 1 keeps the weights in host memory and drops the KV cache.
        No-op on CPU (vLLM's CPU worker has no sleep mode)."""
        if self.on_gpu and self.cfg.sleep_between_steps and not self._asleep:
            self._require_llm_for_update().sleep(level=1)
        self._asleep = self.on_gpu and self.cfg.sleep_between_steps

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate GPU memory. Around a weight update: ``wake_up(["weights"])``, update, then
        ``wake_up(["kv_cache"])`` (see the module docstring). ``None`` wakes everything."""
        if self.on_gpu and self._asleep:
            # vLLM resumes scheduling only once weights and KV cache are both resident again.
            self._asleep = not self._require_llm_for_update().wake_up(tags=tags)
        else:
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and release its memory; the object cannot be used afterwards."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            with _keep_default_process_group():
                llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the engine may not have fully started
            pass
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
