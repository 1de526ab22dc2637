"""Browser pages: sign-in, upload, result and review, administration."""
