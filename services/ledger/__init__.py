"""Double-entry ledger: posts charges against each customer's credit pool, funded by agreements; closes
months into statements."""
