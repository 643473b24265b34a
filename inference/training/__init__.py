"""Training of TrialTwin's learned models from twin simulations, with ONNX export and validation.

Needs the ``train`` extra (scikit-learn, skl2onnx); serving needs only ONNX Runtime.
"""
