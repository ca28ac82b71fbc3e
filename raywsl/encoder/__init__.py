"""The train-encoder stage: a point-cloud-conditioned field. An encoder (models/pointnet.py) maps a
shape's surface point cloud to a condition c, and a head maps c to a row of the weight store's field
type (MLP weights, LoRA / mLoRA adapters on the frozen base, a DeepSDF latent): c reconfigures the
field's effective weights, as in the shape foundation model the topology probes study (papers/000).
Trained under Ray Train on the ingested surface points and the fitted rows (train.py); its
reconstruction quality on held-out shapes is measured when it is published (recon.py).

    from raywsl.encoder import load_encoder
    enc = load_encoder(cfg, plan_for(cfg, encoder=True))
    rows = enc.rows(enc.conditions(clouds))      # model.py: the API, documented there
"""

from raywsl.encoder.model import EncoderError, PointCloudEncoder, load_encoder

__all__ = ["EncoderError", "PointCloudEncoder", "load_encoder"]
