"""Dashboard tests in headless Chromium (Debian package, never a downloaded browser)."""
