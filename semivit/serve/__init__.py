"""semivit.serve: the batch prediction engine behind ``ssl predict`` (see docs/predict.md).

resolve.py       --model -> ModelRef (export dir, run dir, or registry current version)
backends.py      Backend interface, degradation Level, registry of backends, open_backend()
ort_session.py   ONNX Runtime: CPU, CUDA and TensorRT execution providers (provider checked)
trt_engine.py    native TensorRT engine (EXPORT/model.engine + engine.json check)
torch_eager.py   PyTorch eager on a run's checkpoints
loader.py        decoding + resizing in worker processes, in order, bounded look-ahead
scheduler.py     --time-limit: measured throughput, step-down between levels, stop in time
engine.py        the loop: chunks -> batches -> one row per file
writers.py       csv / json / kaggle, streamed to a temporary file, renamed into place
shard.py         --shard I/N by a stable hash of the relative path
predict.py       predict_cli / run_predict: validation, wiring, summary, exit codes
timing.py        one backend timed in its own process (`ssl export`'s serving candidates)
"""
