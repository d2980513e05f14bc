"""Evaluations of a trained run, from its checkpoints (the held-out loss during training is
`longtrain.trainer.evaluate`).

passkey.py   passkey retrieval by context length and depth: passkey.json and a heatmap
"""
