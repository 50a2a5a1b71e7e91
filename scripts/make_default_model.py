"""Rebuild the embedded default model: a tiny, UNTRAINED consistency student from seeded weights.

It exists so the main job and `musiccm generate` run offline on a fresh machine. It makes noise,
not music; the trained demo student replaces it (see README). Usage: python scripts/make_default_model.py
"""

from musiccm import model
from musiccm.build import build_components
from musiccm.defaults import DEFAULT_MODEL
from musiccm.student import as_student

if __name__ == "__main__":
    student = as_student(build_components("tiny", seed=0))
    info = {"name": "musiccm-untrained-tiny", "trained": False, "note": "random weights; makes noise"}
    print(model.save(student, DEFAULT_MODEL, extra=info))
