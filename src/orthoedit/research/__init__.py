"""Research: study sites (sites) and attribute (attribute)."""
