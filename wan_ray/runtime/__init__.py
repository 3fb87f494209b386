"""Ray actors around the stages: stage actors and their recipes (`actors`), gangs of rank actors sharing one
process group in a placement group their leader owns (`gang`), topologies (`topology`), the per-job ledger
of started and finished rows (`ledger`) and the envelope rows travel in between pools (`rows`).

Knows Ray, not Ray Data or Serve: the batch job and the endpoint both build on it.
"""
