"""Thin adapters over pilots for other training loops; no algorithm lives here."""
