"""What fleet sees of the models it serves: prediction log, feedback and join, quality, drift, alerts, retraining.

In an ingress replica (the request path, per batch, never per request beyond a tuple):
- `replica`: request ids, each version's log schema and batch observer, the feedback route's writer;
- `observe`: what an answered batch leaves: rows kept for the drift counts, a `BatchRecord` for the log;
- `logrows`, `hashing`: the log's rows and columns (Parquet schema, redaction, sampling, row hashes);
- `predlog`: the bounded buffer and writer thread of the prediction log (hive-partitioned zstd Parquet);
- `feedback`: `POST /v2/models/{m}/feedback`, labels checked and written to Parquet;
- `contracts`: input contracts, checked per batch by `native.check_bounds`.
In the monitor actor (`actor`, running `engine` once a second):
- `join`: labels joined to their predictions (pyarrow), memory first, disk for old ones;
- `quality`: accuracy, ROC AUC, error rate, calibration over windows of labelled predictions;
- `drift`, `detectors`: calibrated window tests and CUSUMs per stream, the label-error CUSUM;
- `rank`: the ranking test of a binary classifier's labelled scores;
- `alerts`: the audit file and the webhook; `retrain`: the retrain trigger (Jobs SDK);
- `exposition`: the monitoring metrics of `/metrics`.
Shared with training: `reference`, what a version's live traffic is compared with (metadata.json).
"""
