"""semivit.pseudo: pseudo-labelling, one component for stage 2, ``ssl refresh`` and the EMA-Teacher.

rules.py     threshold rules by config name (global, oof, ...): a registry, how to add one
select.py    UMAP + KMeans cluster cores, the rule's thresholds, per-class caps: label_pool()
samples.py   pseudo-label rows -> extra training samples (Extra)
"""
