"""Whole runs: recipes and orthoedit run (recipe), orthoedit demo (demo)."""
