"""Stage 6: routing and fallback (policies, signals, simulation, threshold choice, client, monitor)."""
