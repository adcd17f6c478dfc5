"""The ONNX contract: graph file names, input/output names and dynamic axes, shared by export and engine.

Two graphs (DESIGN.md section 4), no If-merged decoder:

encoder.onnx
    src_ids  int64 [batch, src_len], src_mask bool [batch, src_len] (True = real token)
    -> cross_k, cross_v float32 [n_decoder_layers, batch, n_heads, src_len, d_head]
decoder_step.onnx
    tokens int64 [rows, 1]; self_k, self_v float32 [n_decoder_layers, rows, n_heads, past_len, d_head]
    (past_len may be 0); cross_k, cross_v as above with rows; src_mask bool [rows, src_len]
    -> log_probs float32 [rows, vocab]; new_self_k, new_self_v [n_decoder_layers, rows, n_heads, past_len + 1,
    d_head]; attention float32 [rows, src_len] (last decoder layer's cross-attention, mean over heads)
Cross K/V are inputs of the step, never outputs: re-emitting them every step is a known slowdown.
"""

OPSET = 18
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_STEP_FILE = "decoder_step.onnx"
CONFIG_FILE = "config.json"

ENCODER_INPUTS = ("src_ids", "src_mask")
ENCODER_OUTPUTS = ("cross_k", "cross_v")
DECODER_INPUTS = ("tokens", "self_k", "self_v", "cross_k", "cross_v", "src_mask")
DECODER_OUTPUTS = ("log_probs", "new_self_k", "new_self_v", "attention")

# Axis names per tensor; axes that are not named here are fixed by the model config.
DYNAMIC_AXES = {
    "src_ids": {0: "batch", 1: "src_len"},
    "src_mask": {0: "batch", 1: "src_len"},
    "tokens": {0: "batch"},
    "self_k": {1: "batch", 3: "past_len"},
    "self_v": {1: "batch", 3: "past_len"},
    "cross_k": {1: "batch", 3: "src_len"},
    "cross_v": {1: "batch", 3: "src_len"},
}
