"""Report rendering for famfind scans (terminal now; HTML templates live beside this file)."""
