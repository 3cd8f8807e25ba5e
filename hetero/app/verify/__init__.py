"""hetero verify: cross-device retrieval check of exported edge artifacts against the cloud space."""
