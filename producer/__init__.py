"""Producer side of segq: submit, watch and report. Never imports torch."""
