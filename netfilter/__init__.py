"""Network filters for COLO: mirror, redirector, rewriter, packet comparison (pyroute2 plumbing)."""
