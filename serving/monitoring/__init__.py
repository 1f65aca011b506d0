"""What fleet sees of the models it serves: prediction log, feedback and join, quality, drift, alerts, retraining.

Modules (one role each):
- `reference`: the reference a version is judged against (score and PCA histograms, baseline label error),
  computed at training time and stored in its metadata.json under `monitoring`; shared by training and serving.
"""
