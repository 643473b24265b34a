"""Rendered reports (HTML with inline SVG plots) that operations attach to the resources they store."""
