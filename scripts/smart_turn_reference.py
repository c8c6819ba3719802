#!/usr/bin/env python3
"""Scores the test recording's cuts with the end-of-turn model the way its authors' code does
(pipecat-ai 1.14.0: its vendored Whisper features and ONNX Runtime), for the reference values
of `local_engines::the_end_of_turn_model_scores_as_its_reference_implementation_does`.

ONNX Runtime's int8 kernels differ between CPUs (with VNNI instructions or without), and so
do the scores: run this on a machine of a new kind and add its values to the test.

    python3 -m venv /tmp/ref/venv && /tmp/ref/venv/bin/pip install numpy onnxruntime==1.31.1
    pip download --no-deps pipecat-ai==1.14.0 -d /tmp/ref
    unzip -o /tmp/ref/pipecat_ai-1.14.0-py3-none-any.whl \
        'pipecat/audio/turn/smart_turn/_whisper_features.py' -d /tmp/ref/src
    /tmp/ref/venv/bin/python scripts/smart_turn_reference.py \
        /tmp/ref/src/pipecat/audio/turn/smart_turn "$ATLAS_MODELS_DIR"
"""

import sys
import wave
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, sys.argv[1])
from _whisper_features import compute_whisper_log_mel_features  # noqa: E402

models = Path(sys.argv[2])
root = Path(__file__).resolve().parent.parent
with wave.open(str(root / "tests/audio/question_16k.wav")) as w:
    audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)

options = ort.SessionOptions()
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.inter_op_num_threads = 1
options.intra_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(
    str(models / "smart-turn/smart-turn-v3.2-cpu.onnx"), sess_options=options
)
window = 8 * 16_000
for cut in [8_000, 25_600, len(audio)]:
    x = audio[:cut].astype(np.float32) / 32768.0
    x = x[-window:] if len(x) > window else np.pad(x, (window - len(x), 0))
    features = compute_whisper_log_mel_features(x, do_normalize=True)[None]
    print(cut, session.run(None, {"input_features": features})[0][0].item())
