"""qatflow."""
