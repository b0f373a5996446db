"""Leaf helpers of exml_fast, imported by every layer and importing none of them: argument checks, atomic
file io, derived seeds and config differences, machine provenance."""
