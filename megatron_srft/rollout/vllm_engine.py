"""vLLM's ``LLM`` colocated in the training processes: the :class:`~megatron_srft.rollout.base.Engine` we ship.

Every engine runs under vLLM's ``external_launcher`` executor, at any rollout TP: the trainer's processes (started
by torchrun) are vLLM's workers. Consecutive global ranks form one engine ([0..r-1], [r..2r-1], ... for rollout TP
r; vLLM builds its TP groups that way), each rank holds one shard, and every rank of an engine calls ``generate``
with the same prompts and seeds. The executor places each engine shard on ``LOCAL_RANK``'s device, so on a GPU node
every engine sits on its own GPU (vLLM's ``uni`` executor would put all of them on cuda:0). Which ranks form which
engine and which prompts each serves is rollout/placement.py's business. Nothing here runs a second process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in-process, so a weight update is a function call that
reads the trainer's tensors directly (no IPC, no serialisation), and ``collective_rpc`` reaches the local worker.

Log-probs. vLLM returns, per generated token, the log-prob of the sampled token under a distribution chosen
by ``logprobs_mode``. We use ``raw_logprobs``: ``log_softmax(logits)`` of the model itself, before
temperature, top-p or any logits processor. That is the policy the trainer scores (``log pi_theta(y_t)`` at
temperature 1), so ``engine_logprob - trainer_logprob`` measures only the numerical mismatch between the two
implementations, which is what :mod:`.mismatch` monitors and what truncated importance sampling corrects.
``processed_logprobs`` (after temperature / top-p) would be the true behaviour distribution of the sampler,
but comparing it with the trainer mixes the sampling transform into the mismatch; at temperature 1 and
top_p 1 (SRFT's rollout setting) the two modes coincide.

GPU memory (docs/rollout.md): with ``rollout.sleep_level`` > 0 the engine is built with ``enable_sleep_mode``; the
rollout service puts it to sleep after every generation (level 1: weights offloaded to host, KV cache dropped;
level 2: both dropped) and, before the next one, wakes the weights, syncs them, and only then the KV cache
(``wake_up(["weights"])``, update, ``wake_up(["kv_cache"])``), so the KV cache never coexists with the weight-sync
buffers. vLLM's CPU worker has no sleep mode: there the same calls reach vLLM (its scheduler pauses, its executor
records the sleeping tags) and its worker frees nothing.

Closing a sleeping engine wakes it first. Sleep unmaps and releases the physical memory behind vLLM's pooled
allocations (``CuMemAllocator.sleep``); shutting the engine down frees their tensors, and the allocator's free
callback hands the full handle back for a second unmap and release, which it skips for sleeping allocations only on
ROCm (``CuMemAllocator._python_free_callback``). On CUDA the C allocator's ``cuMemUnmap`` of the unmapped range
fails and leaves its process-wide error flag set (vLLM's csrc/cumem_allocator.cpp), after which every pooled
allocation fails: a second engine in the same process (the study, the demo) could not start. Waking maps the
memory back, and the release is then an ordinary one.
"""

from __future__ import annotations

import _posixshmem  # multiprocessing.shared_memory's shm_unlink: the name rules of vLLM's shm_open
import gc
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..config import RolloutConfig
from ..distributed import collectives, cpu_compat
from ..distributed.groups import ensure_launcher_env
from ..dtypes import DTYPES, dtype_name
from ..errors import ConfigError, UserError, first_line
from ..models.arch import load_arch
from .base import Completion

#: The CPU attention kernel supports these head sizes (16 is rejected at start-up with an obscure error).
_MIN_CPU_HEAD_DIM = 32

#: vLLM's CPU worker warns at every sleep and wake that it frees nothing: expected, and three times a step.
_CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
_CPU_SLEEP_WARNING = "sleep mode is not supported on CPU"

#: Engines whose wake-up failed at close(): kept referenced, never released (module docstring: releasing a sleeping
#: engine's memory on CUDA is a double release). Their memory returns when the process exits.
_UNRELEASED: list = []


def _not_cpu_sleep_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_CPU_SLEEP_WARNING)


class ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's "X: Failed to load weights" warnings that every healthy weight sync produces.

    vLLM's in-place reload (``reload_weights``) warns for each layer that received no tensor and got its previous
    tensors back. A sync sends every weight of the HF checkpoint, so two kinds of layer legitimately receive
    none: rotary embeddings (their cos/sin cache is computed, never loaded) and, with tied embeddings, the LM head
    (it shares the embedding, which is sent). A newcomer sees "Failed" at every step of a healthy run; the same
    warning for any other layer (a real missing weight) stays visible.
    """

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def __init__(self, tied_lm_head: bool) -> None:
        super().__init__()
        self.expected = {"ParallelLMHead"} if tied_lm_head else set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.endswith(": Failed to load weights"):
            return True
        layer = message.split(":", 1)[0]
        return not (layer.endswith("RotaryEmbedding") or layer in self.expected)

    @classmethod
    def install(cls, tied_lm_head: bool) -> None:
        """Once per process (replacing an earlier one: the last engine's model decides about the LM head)."""
        logger = logging.getLogger(cls.LOGGER)
        for f in [f for f in logger.filters if isinstance(f, cls)]:
            logger.removeFilter(f)
        logger.addFilter(cls(tied_lm_head))


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


def _unlink_cpu_shm_names(worker) -> int:
    """Remove the names of this rank's CPU shared-memory segments once the engine has started (runs on the vLLM
    worker; CPU, rollout TP > 1). Returns how many names it removed.

    vLLM's CPU communicator gives each rank of a TP / PP group one POSIX shared-memory segment, named after the
    group alone (under external_launcher every engine on the machine gets the same names), and removes the names
    only when its manager is destroyed at a normal interpreter exit. A process that ends otherwise (killed, or
    ``os._exit`` as forked ranks do) leaves them in /dev/shm, and the next engine with those names on the machine
    fails to start ("create shm in SHMManager failed. errno: 17"). Start-up ends after every rank has joined every
    segment, so the names are no longer needed; the mapped memory lives on until the process ends.
    """
    # lazy, as every vLLM import of this module: commands set VLLM_LOGGING_LEVEL in main(), after importing this
    # module (cli/demo.py, experiments/study.py); older vLLM releases read it at import (0.32: at engine build)
    from vllm.distributed import parallel_state

    removed = 0
    for group in (parallel_state.get_tp_group(), parallel_state.get_pp_group()):
        comm = getattr(group, "device_communicator", None)
        name = getattr(getattr(comm, "dist_module", None), "group_name", None)  # only vLLM's SHM module has one
        if name is None:
            continue
        try:
            _posixshmem.shm_unlink(f"/{name.lstrip('/')}_{comm.rank}")
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class VllmEngine:
    """vLLM in the training process(es). See the module docstring for the design.

    Args:
        cfg: the ``rollout`` config section (TP size, memory, KV cache size, sleep level).
        model_dir: HF directory (config.json + tokenizer; weights unless ``load_format="dummy"``).
        dtype: "fp32" | "bf16" | "fp16" (or vLLM's spelling); CPU rollouts for exactness use fp32.
        seed: engine seed (sampling seeds are passed per call).
        max_model_len: prompt + response tokens the engine must hold.
        load_format: "auto" reads the weights in ``model_dir``; "dummy" starts with random weights to be
            replaced by :meth:`update_weights` (no weight files needed: start from a Megatron checkpoint).
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, dtype: str, seed: int, max_model_len: int,
                 load_format: str = "auto", kv_cache_bytes: Optional[int] = None):
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.max_model_len = int(max_model_len)
        self.on_gpu = torch.cuda.is_available()
        self.sleeping: set[str] = set()  # tags released by sleep() and not yet woken: {"weights", "kv_cache"}
        self.llm = None
        self._check_settings(dtype, load_format)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (read at LLM build)
        ensure_launcher_env()  # external_launcher reads RANK / LOCAL_RANK (a single process has neither)
        if not self.on_gpu and kv_cache_bytes is None:  # vLLM's CPU default; resolved settings pass the size
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gib or 1)
        kwargs = dict(
            model=self.model_dir,
            dtype=DTYPES[dtype_name(dtype)].torch_name,  # vLLM spells dtypes as torch does
            seed=seed,
            max_model_len=self.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            logprobs_mode="raw_logprobs",
            max_logprobs=0,  # only the sampled token's log-prob is ever requested
            load_format=load_format,
            **({"kv_cache_memory_bytes": int(kv_cache_bytes)} if kv_cache_bytes and not self.on_gpu else {}),
            enforce_eager=cfg.enforce_eager or not self.on_gpu,  # CPU: torch.compile only slows start-up
            disable_log_stats=True,
        )
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_sleep_mode=cfg.sleep_level > 0)
        start = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM's start-up errors are long multi-line traces: keep the cause, one line
            raise UserError(f"rollout engine failed to start for {self.model_dir}: {first_line(e, 300)}") from e
        self.startup_seconds = time.perf_counter() - start
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.weight_dtype = self.llm.llm_engine.model_config.dtype  # Engine.weight_dtype: the sync casts to it
        ExpectedReloadWarnings.install(tied_lm_head=load_arch(self.model_dir).tie_word_embeddings)
        if not self.on_gpu:
            logging.getLogger(_CPU_WORKER_LOGGER).addFilter(_not_cpu_sleep_warning)  # added once per process
            self.llm.collective_rpc(_unlink_cpu_shm_names)

    # ------------------------------------------------------------------------------------------ set-up

    def _check_settings(self, dtype: str, load_format: str) -> None:
        cfg_path = Path(self.model_dir) / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: not found (the rollout engine needs a Hugging Face config.json)")
        if dtype_name(dtype) is None:
            raise ConfigError(f"rollout.dtype: expected one of fp32, bf16, fp16, got {dtype!r}")
        if load_format not in ("auto", "dummy", "safetensors"):
            raise ConfigError(f"rollout engine load_format: expected auto | dummy | safetensors, got {load_format!r}")
        if self.max_model_len < 2:
            raise ConfigError(f"rollout.max_model_len: expected >= 2, got {self.max_model_len}")
        arch = load_arch(self.model_dir)
        if self.max_model_len > arch.max_position_embeddings:
            raise ConfigError(f"rollout.max_model_len: {self.max_model_len} exceeds the model's "
                              f"max_position_embeddings ({arch.max_position_embeddings}) in {cfg_path}")
        if not self.on_gpu and arch.head_dim < _MIN_CPU_HEAD_DIM:
            raise ConfigError(f"{cfg_path}: head_dim {arch.head_dim} is not supported by vLLM's CPU attention "
                              f"kernel; expected >= {_MIN_CPU_HEAD_DIM}")

    def _require_llm(self):
        if self.llm is None:
            raise UserError("rollout engine: used after close()")
        if self.sleeping:
            raise UserError(f"rollout engine: generate() while {' and '.join(sorted(self.sleeping))} sleep; "
                            "call wake_up() first")
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
                 top_p: float = 1.0, max_tokens: int = 16, seeds: Optional[list[int]] = None,
                 stop_token_ids: Optional[list[int]] = None,
                 stop: Optional[list[str]] = None) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt. Returns [num_prompts][n] :class:`Completion`.

        Seeds: prompt i's samples use seed ``seeds[i] + j`` (j = sample index, vLLM adds j itself); the caller
        makes them a function of the prompt's identity (rollout/service.py: seed, step, global prompt index), so
        a sample does not depend on which engine drew it or what else was in the batch. None = unseeded.
        ``temperature=0`` is greedy. A response stops at ``max_tokens``, at ``max_model_len`` tokens in all, at a
        stop token id, or at a ``stop`` string: vLLM then detokenizes as it samples and ends the response with the
        token that completes the string (the token ids, which the trainer learns from, keep that token and nothing
        after it; finish_reason "stop").
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
        if seeds is not None and len(seeds) != len(prompt_token_ids):
            raise UserError(f"rollout generate: {len(seeds)} seeds for {len(prompt_token_ids)} prompts")
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        params = []
        for i, p in enumerate(prompt_token_ids):
            room = self.max_model_len - len(p)
            params.append(SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                stop_token_ids=list(stop_token_ids or []), seed=None if seeds is None else int(seeds[i]),
                logprobs=0, detokenize=bool(stop), stop=list(stop or []), include_stop_str_in_output=True,
            ))
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_token_ids]
        try:
            # vLLM's CPU kernels never name a CUDA device: outside the CPU layer's function mode, whose per-op
            # dispatch cost 10-15% of the toy's generation time (docs/benchmarks.md).
            with cpu_compat.suspended():
                outputs = llm.generate(prompts, params, use_tqdm=False)
        except (ValueError, TypeError, VLLMValidationError) as e:
            raise UserError(f"rollout generate: {first_line(e, 300)}") from e
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

    def sleep(self, level: int) -> None:
        """Free device memory between generations: level 1 offloads the weights to host memory and drops the KV
        cache, level 2 drops both (the caller reloads the weights before the next generation). On CPU vLLM records
        the sleep and frees nothing (its CPU worker has no sleep mode)."""
        if level not in (1, 2):
            raise ValueError(f"rollout engine sleep: level must be 1 or 2, got {level}")
        if not self.sleeping:
            self._require_llm_for_update().sleep(level=level)
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate device memory: ``["weights"]``, then the update, then ``["kv_cache"]`` (module docstring);
        ``None`` wakes everything."""
        wanted = {"weights", "kv_cache"} if tags is None else set(tags)
        todo = sorted(wanted & self.sleeping)
        if todo:
            self._require_llm_for_update().wake_up(tags=todo)
        self.sleeping -= wanted

    def close(self) -> None:
        """Wake the engine if it sleeps, shut it down and release its memory; the object cannot be used afterwards.

        A sleeping engine's memory was already released by vLLM's sleep; shutting it down as it is would release it
        again (module docstring). When the wake-up fails the engine is kept, unreleased, until the process exits."""
        llm = self.llm
        if llm is None:
            return
        if self.sleeping:
            try:
                self.wake_up()
            except Exception as e:  # noqa: BLE001 - e.g. no room on the GPU to map the memory back
                _UNRELEASED.append(llm)
                self.llm = None
                logging.getLogger(__name__).warning(
                    "rollout engine: could not wake the sleeping engine before closing it (%s); it stays in memory "
                    "until the process exits", first_line(e, 300))
                return
        self.llm = None
        try:
            with collectives.keep_default_group():
                llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the engine may not have fully started
            pass
        del llm
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
