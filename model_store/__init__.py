"""Where models live on disk: the cache folder and the default model's conversion."""
