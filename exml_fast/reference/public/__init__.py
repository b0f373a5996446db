"""Faithful ports of public code used as baselines (DeepInversion's BN hooks and synthesis loop): the peer a
user already has, not a twin of one of our ops."""
