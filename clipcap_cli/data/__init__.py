"""Images in, CLIP embeddings out: inputs, the one image loader and encoder, datasets, features stores."""
