"""Retrieval: Recall@N and the evaluation protocol, whitening (PCA, learned), the localization view,
top-1 precision-recall, the prediction table and retrieval pictures, descriptor exports."""
