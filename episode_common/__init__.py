"""Small pieces shared by the receiver, the shipper and the operator tools."""
