"""The embedded default: a synthetic shapes corpus served on loopback, and the staged demo run."""
