"""Ray plumbing: cluster start/auth, Train workers, the view-bank job, sharded batch inference."""
