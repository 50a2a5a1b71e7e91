"""Install a distilled demo student as the package's embedded default model (musiccm/assets/default).

    python recipes/demo/install.py --student outputs/demo-hour/student-2step --card recipes/demo/MODEL_CARD.md \
        --max-timestep 699

Copies the MusicLDM-layout directory, stores the UNet's weights in float16 (loaded back as float32 by
``musiccm.model.load``; halves the largest file so the directory stays under ~30 MB), names the model in
``model_index.json`` and puts the model card beside the weights as README.md. Checks that the result loads
and generates before replacing the old default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "musiccm" / "assets" / "default"
CLASSIFIER_TARGET = ROOT / "musiccm" / "assets" / "demo_classifier"
LIMIT_MB = 30.0


def halve_unet(directory: Path) -> None:
    """Rewrite the UNet's safetensors in float16 (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = directory / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}
    save_file(tensors, str(path), metadata=metadata)


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="exported student directory (ray_jobs/distill.py --output)")
    p.add_argument("--card", required=True, help="model card (Markdown) to ship as README.md beside the weights")
    p.add_argument("--name", default="musiccm-demo-v7", help="model name in model_index.json (default %(default)s)")
    p.add_argument("--target", default=str(TARGET), help="where to install (default: the package's default model)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="the model's default highest sampling timestep (model_index.json; see "
                        "musiccm.schedule.lcm_timesteps); default: none, i.e. LCM's 999")
    p.add_argument("--classifier", default=None,
                   help="also install this label classifier (recipe stage 'classifier') as "
                        "musiccm/assets/demo_classifier: the evaluation feature network for the demo world")
    args = p.parse_args(argv)
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "default"
        shutil.copytree(args.student, staged)
        halve_unet(staged)
        index = json.loads((staged / "model_index.json").read_text())
        extra = index.setdefault("musiccm", {})
        extra.update(name=args.name, trained=True, note="demo student distilled from a small teacher trained on "
                     "synthetic soundfont music (recipes/demo); follows instrument, tempo, mode and drum prompts")
        if args.max_timestep is not None:
            extra["max_timestep"] = args.max_timestep
        (staged / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copy(args.card, staged / "README.md")
        c = model.load(str(staged))
        out = MusicCM(c, GenerationConfig(steps=2)).generate(["slow piano"], 3.0, [0])
        assert out.waveforms.shape == (1, c.geometry.num_samples(3.0)), out.waveforms.shape
        mb = size_mb(staged)
        if mb > LIMIT_MB:
            raise SystemExit(f"install: {mb:.1f} MB is over the {LIMIT_MB} MB budget of the embedded model")
        target = Path(args.target)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(staged, target)
    print(f"installed {args.name} ({mb:.1f} MB) at {target}")
    if args.classifier:
        from musiccm.evaluation import classifier

        classifier.load(args.classifier)  # refuses anything that is not a saved LabelClassifier
        if CLASSIFIER_TARGET.exists():
            shutil.rmtree(CLASSIFIER_TARGET)
        shutil.copytree(args.classifier, CLASSIFIER_TARGET)
        print(f"installed the label classifier at {CLASSIFIER_TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
