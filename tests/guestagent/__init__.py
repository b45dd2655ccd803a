"""Tests of the guest agent (guestagent/)."""
