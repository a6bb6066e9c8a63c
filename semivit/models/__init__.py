"""semivit.models: what training, export and serving all use - below all three.

networks.py      timm backbone + the seeds' head (Classifier), the hybrid ViT (vit_hybrid_lite0)
weights.py       offline ImageNet weights, strict loading, local backbone weight files
checkpoint.py    save/load a member checkpoint (semivit-model/1)
ensemble.py      EnsembleModel (uint8 in -> probabilities), members, ensemble.json read/write
"""
