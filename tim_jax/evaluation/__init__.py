"""Sample-quality evaluation: distances between feature distributions (FID and friends)."""
