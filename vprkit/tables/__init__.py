"""Tables: what a script reads (poses CSVs, embeddings parquets, benchmark layouts; load.py is the
one entry point), images decoded upright, the pair rule over positions or labels, and the demo route."""
