"""Evaluation of generated music with the MusicCM paper's metrics (FD_pann, FD_vgg, IS, KL, KID, CLAP, SIM_AA).

- `metrics`: pure metric functions on feature arrays (audioldm_eval's math where it has the metric).
- `features`: the feature networks (Cnn14, VGGish, CLAP), their weights, audio decoding, the Ray Data stage.
- `report`: metrics.json and the Markdown table laid out like MusicCM Table 1.
The job that ties them together is `musiccm.jobs.evaluate` (`ray_jobs/evaluate.py`).
"""
