"""Write RANDOMLY INITIALISED evaluation networks in the formats real weights come in (tests, smoke runs).

    python scripts/make_random_eval_weights.py --out weights/ [--seed 0] [--format pth|safetensors]

writes
    weights/Cnn14_16k_mAP=0.438.pth   {"model": state_dict} as the PANNs release (audioldm_eval's Cnn14 16 kHz)
    weights/vggish-10086976.pth       a plain state dict as torch.hub caches harritaylor/torchvggish's VGGish
    weights/clap/                     a tiny transformers ClapModel directory (config, safetensors, tokenizer,
                                      feature extractor), usable as --clap-model
The metrics they give mean nothing; the code path (files passed by path, loaded and checked) is the real one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch


def _save(state: dict[str, torch.Tensor], path: Path, wrap: bool, numpy_extras: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    obj: dict = {"model": state} if wrap else state
    if numpy_extras:  # what the PANNs release also pickles: iteration and the sampler's numpy state
        obj.update(iteration=1, sampler={"indexes_per_class": [np.arange(3), np.arange(2)], "pointer": np.int64(0)})
    torch.save(obj, path)
    return path


def make_pann(path: str | os.PathLike, seed: int = 0, numpy_extras: bool = False) -> Path:
    """Random Cnn14 16 kHz (≈81 M parameters, ≈325 MB) with BatchNorm statistics that are not the identity."""
    from audioldm_eval.feature_extractors.panns.models import Cnn14_no_specaug

    from musiccm.evaluation.features import CNN14_16K

    torch.manual_seed(seed)
    net = Cnn14_no_specaug(**CNN14_16K)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return _save(net.state_dict(), Path(path), wrap=True, numpy_extras=numpy_extras)


def make_vggish(path: str | os.PathLike, seed: int = 0) -> Path:
    """Random VGGish (≈72 M parameters, ≈290 MB) with torchvggish's state-dict keys."""
    from musiccm.evaluation.features import vggish_network

    torch.manual_seed(seed)
    return _save(vggish_network().state_dict(), Path(path), wrap=False)


def make_clap(directory: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random ClapModel (the repository's tiny CLAP config) saved as a transformers model directory."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    from musiccm.build import build_tokenizer, clap_config

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    ClapModel(ClapConfig(**clap_config("tiny", len(tokenizer)))).save_pretrained(directory, safe_serialization=True)
    ClapFeatureExtractor().save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the three networks into")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    p.add_argument("--format", choices=["pth", "safetensors"], default="pth", help="Cnn14/VGGish file format")
    args = p.parse_args(argv)
    out = Path(args.out)
    pann_name = "Cnn14_16k_mAP=0.438" if args.format == "pth" else "Cnn14_16k"
    print(make_pann(out / f"{pann_name}.{args.format}", args.seed))
    print(make_vggish(out / f"vggish-10086976.{args.format}", args.seed))
    print(make_clap(out / "clap", args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
