"""transformers' own BitNet model, loaded in float32, as the reference every conversion is checked against.

transformers has no class for the 1bitLLM models (`BitnetForCausalLM`, remote code that is never run here). Their
published modeling code computes what transformers' `BitNetForCausalLM` computes with online AutoBitLinear
layers: the same weight quantizer (scale 1/max(mean|W|, 1e-5), round, clip to -1..1, divide back), the same
per-token absmax int8 activation quantizer, RMSNorm sub-norms before o_proj and down_proj, a SiLU-gated FFN. So
their reference is that class, loaded from the same weights written in the online layout (sub-norms renamed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bitnet_convert.fileio.safetensors_io import has_safetensors_weights, no_weights
from bitnet_core.errors import ConvertError
from bitnet_core.extras import require


def load_reference(hf_dir: str | os.PathLike):
    """`AutoModelForCausalLM.from_pretrained` on an HF BitNet folder, every floating tensor in float32.

    The folder's config.json must carry its `quantization_config`: without it transformers builds plain
    nn.Linear layers and computes no BitNet quantization (docs/formats.md §2). transformers leaves unpacked
    autobitlinear weights in bf16 and refuses `.float()` on quantized models, so the cast is done by hand;
    ternary values and bf16 norms cast to float32 exactly.
    """
    _require_safetensors(Path(hf_dir))
    if _is_latent(Path(hf_dir)):
        return _latent_reference(Path(hf_dir))
    require("accelerate", "the transformers reference")  # transformers loads packed BitNet weights with it
    torch = require("torch", "the transformers reference")
    transformers = require("transformers", "the transformers reference")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        # use_safetensors: never fall back to pytorch_model.bin, which torch.load unpickles
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                                  use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConvertError(f"{hf_dir}: transformers cannot load this reference: {str(exc).splitlines()[0]}") from exc
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(module, name, buf.float())
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        # BitLinear keeps its unpack dtype as a plain attribute; PreTrainedModel.dtype is a read-only property.
        if vars(module).get("dtype") == torch.bfloat16:
            module.dtype = torch.float32  # BitLinear unpacks its weights to this dtype in every forward
    model.eval()
    return model


def _is_latent(folder: Path) -> bool:
    from bitnet_convert.fileio.sources import SourceWatch, read_json_file
    from bitnet_core.config import LATENT_ARCHITECTURE

    config = read_json_file(SourceWatch(), folder / "config.json", "config file")
    return (config.get("architectures") or [None])[0] == LATENT_ARCHITECTURE and not config.get("quantization_config")


def _latent_reference(folder: Path):
    import tempfile

    from bitnet_convert.formats import hf

    with tempfile.TemporaryDirectory(prefix="bitnet-reference-") as tmp:
        online = hf.write(hf.read(str(folder)), str(Path(tmp) / "online"), layout="online")
        return load_reference(online)  # every tensor is in memory once loaded: the folder may go


def _require_safetensors(folder: Path) -> None:
    """The reference's weights must be safetensors: a pickle (pytorch_model.bin ...) is never loaded, not even
    through torch's weights-only unpickler."""
    if not has_safetensors_weights(folder):
        raise no_weights(folder)


def reference_logits(model, token_ids: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of the reference for int token ids [B, T] (no padding)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(token_ids, dtype=np.int64)))
    return out.logits.float().numpy()


def load_embedding_reference(hf_dir: str | os.PathLike):
    """transformers' own backbone (`Qwen3Model` / `Gemma3TextModel`) with BitNet linear layers, float32, for a
    BitNet-embedding folder (docs/formats.md §12).

    transformers computes their BitLinear with `BitNetQuantConfig(use_rms_norm=True)` and online quantization
    from the bf16 masters, but names the norm `<proj>.rms_norm.weight` where the files say `<proj>.norm.weight`:
    so the folder is copied with that rename and the quantization_config, and loaded from the copy.
    """
    import json
    import tempfile

    from bitnet_convert.fileio.sources import SourceWatch, read_json_file

    folder = Path(hf_dir)
    _require_safetensors(folder)
    torch = require("torch", "the transformers reference")
    transformers = require("transformers", "the transformers reference")
    from safetensors.torch import load_file, save_file

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = read_json_file(SourceWatch(), folder / "config.json", "config file")
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                     "quantization_mode": "online", "use_rms_norm": True,
                                     "rms_norm_eps": config.get("rms_norm_eps", 1e-6)}
    with tempfile.TemporaryDirectory(prefix="bitnet-embedding-reference-") as tmp:
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            for name, value in load_file(str(file)).items():
                tensors[name.removeprefix("model.").replace("_proj.norm.", "_proj.rms_norm.")] = value
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            model = transformers.AutoModel.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ConvertError(f"{hf_dir}: transformers cannot load this reference: {str(exc).splitlines()[0]}") from exc
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    model.eval()
    return model
