"""Stage two: episodic few-shot heads over the cached features (features, episodes, heads, losses, metrics, train, evaluate, checkpoint)."""
