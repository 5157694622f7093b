"""Intake defences for a listener on the open internet: rate limits per client network,
early talkers, DNS block and allow lists, HELO and reverse-DNS checks, allow and block lists
from the configuration, greylisting and a spam-filter hook. The SMTP session consults one
``IntakeDefence`` (mailsys.defence.intake) at connect, HELO, MAIL, RCPT and end of DATA."""
