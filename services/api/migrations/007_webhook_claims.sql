-- A sender claims the deliveries it is about to POST for a while (claimed_until) in a short transaction,
-- POSTs them with no transaction open, then records the attempts in another. Before, the claiming
-- transaction (its row locks and a pooled connection) stayed open while the receivers answered, up to the
-- POST timeout each round. A sender that dies holding a claim leaves the delivery due again once the claim
-- has passed: it is tried again (at least once, as before: the receiver dedupes by the delivery id).
ALTER TABLE webhook_delivery ADD COLUMN claimed_until timestamptz;
