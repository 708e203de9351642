//! IP allow-lists (`allowed_cidrs` on keys, `default_allowed_cidrs` on workspaces) and the
//! client address a verification is checked against.
//!
//! Addresses are compared in one canonical form: an IPv4-mapped IPv6 address
//! (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4 peer) is the IPv4
//! address it maps, and a network inside `::ffff:0:0/96` is the IPv4 network it maps. So
//! `10.0.0.0/8` admits `::ffff:10.1.2.3`, and `::ffff:10.0.0.0/104` admits `10.1.2.3`.
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

use super::validate::Validator;

/// Most networks one allow-list may hold.
pub const ALLOWED_CIDRS_MAX: usize = 64;

/// One network of an allow-list, canonical (host bits cleared, IPv4-mapped as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Network(IpNet);

/// Why an allow-list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an IPv4 or IPv6 network (CIDR such as 10.0.0.0/8 or 2001:db8::/32) or address"
)]
pub struct BadNetwork(String);

impl Network {
    /// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (one host). Host bits set
    /// below the prefix (`10.1.2.3/8`) are refused rather than silently cleared: such an
    /// entry is usually a typo for a narrower network.
    pub fn parse(text: &str) -> Result<Self, BadNetwork> {
        let bad = || BadNetwork(text.chars().take(64).collect());
        let text = text.trim();
        let net = if text.contains('/') {
            let net = IpNet::from_str(text).map_err(|_| bad())?;
            if net.trunc() != net {
                return Err(bad());
            }
            net
        } else {
            IpNet::from(IpAddr::from_str(text).map_err(|_| bad())?)
        };
        Ok(Self(canonical_net(net)))
    }

    pub fn contains(&self, address: ClientAddress) -> bool {
        self.0.contains(&address.0)
    }

    /// Whether every address of `other` is in this network.
    fn covers(&self, other: &Network) -> bool {
        self.0.contains(&other.0)
    }
}

impl fmt::Display for Network {
    /// A one-host network reads as the bare address it was (usually) given as.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// A network in canonical form: IPv4-mapped IPv6 networks as IPv4.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(mapped) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(mapped);
    }
    net
}

/// The networks a key may be used from; empty: from anywhere. Sorted, without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedNetworks(Vec<Network>);

impl AllowedNetworks {
    pub fn new(networks: impl IntoIterator<Item = Network>) -> Self {
        let mut networks: Vec<Network> = networks.into_iter().collect();
        networks.sort();
        networks.dedup();
        Self(networks)
    }

    /// From stored text, every entry of which was parsed before it was stored.
    pub fn from_stored(entries: &[String]) -> Result<Self, BadNetwork> {
        entries
            .iter()
            .map(|e| Network::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a request from `client` may use the key: always with an empty list;
    /// otherwise only from an address inside one of the networks (a request whose address
    /// is unknown is refused).
    pub fn admits(&self, client: Option<ClientAddress>) -> bool {
        self.0.is_empty() || client.is_some_and(|c| self.0.iter().any(|n| n.contains(c)))
    }

    /// Whether this list admits no address that `outer` refuses: for a delegated key,
    /// whose list must lie within its parent's. An empty `outer` admits everything; an
    /// empty list inside a non-empty `outer` would admit everything, so it is not within.
    pub fn within(&self, outer: &AllowedNetworks) -> bool {
        outer.0.is_empty()
            || (!self.0.is_empty() && self.0.iter().all(|n| outer.0.iter().any(|o| o.covers(n))))
    }

    /// The entries as stored and shown.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(Network::to_string).collect()
    }
}

/// An allow-list as a request gives it: at most 64 entries, each named by its index when
/// it is not a network (`allowed_cidrs[2]`).
pub fn allowed_networks(v: &mut Validator, field: &str, entries: &[String]) -> AllowedNetworks {
    if entries.len() > ALLOWED_CIDRS_MAX {
        v.add(
            field,
            format!("must have at most {ALLOWED_CIDRS_MAX} entries"),
        );
        return AllowedNetworks::default();
    }
    let parsed = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| v.check(&format!("{field}[{i}]"), Network::parse(e)))
        .collect::<Vec<_>>();
    AllowedNetworks::new(parsed)
}

/// The address of the client a key is presented by, canonical (IPv4-mapped as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(IpAddr);

/// Why a client address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be an IPv4 or IPv6 address, such as 203.0.113.7 or 2001:db8::1")]
pub struct BadClientAddress;

impl ClientAddress {
    pub fn new(ip: IpAddr) -> Self {
        Self(ip.to_canonical())
    }

    /// An address as a client or Envoy writes it; IPv6 may come in brackets.
    pub fn parse(text: &str) -> Result<Self, BadClientAddress> {
        let text = text.trim();
        let text = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or(text);
        IpAddr::from_str(text)
            .map(Self::new)
            .map_err(|_| BadClientAddress)
    }
}

impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedNetworks {
        AllowedNetworks::new(entries.iter().map(|e| Network::parse(e).unwrap()))
    }

    fn client(text: &str) -> Option<ClientAddress> {
        Some(ClientAddress::parse(text).unwrap())
    }

    #[test]
    fn ipv4_networks_and_hosts() {
        let l = list(&["10.0.0.0/8", "192.0.2.7"]);
        assert!(l.admits(client("10.200.3.4")));
        assert!(l.admits(client("192.0.2.7")));
        assert!(!l.admits(client("192.0.2.8")));
        assert!(!l.admits(client("11.0.0.1")));
        assert!(
            !l.admits(None),
            "an unknown address is refused by a non-empty list"
        );
        assert!(AllowedNetworks::default().admits(None));
    }

    #[test]
    fn ipv6_networks() {
        let l = list(&["2001:db8::/32"]);
        assert!(l.admits(client("2001:db8:1::5")));
        assert!(l.admits(client("[2001:db8::1]")));
        assert!(!l.admits(client("2001:db9::1")));
        assert!(!l.admits(client("10.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_addresses_compare_as_ipv4() {
        let l = list(&["10.0.0.0/8"]);
        assert!(l.admits(client("::ffff:10.1.2.3")));
        let mapped = list(&["::ffff:10.0.0.0/104"]);
        assert_eq!(mapped.to_strings(), ["10.0.0.0/8"]);
        assert!(mapped.admits(client("10.1.2.3")));
        assert!(!mapped.admits(client("11.1.2.3")));
        // A mapped host address is the IPv4 host.
        assert_eq!(list(&["::ffff:192.0.2.1"]).to_strings(), ["192.0.2.1"]);
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "2001:db8::/129",
            "10.1.2.3/8",
            "example.com",
            "10.0.0.0/-1",
            "::1/",
            "1.2.3.4 /32",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(ClientAddress::parse("10.0.0.1:80").is_err());
        assert!(ClientAddress::parse("").is_err());
    }

    #[test]
    fn requests_name_each_bad_entry() {
        let mut v = Validator::new();
        let entries = [
            "10.0.0.0/8".to_owned(),
            "nope".to_owned(),
            "::/129".to_owned(),
        ];
        allowed_networks(&mut v, "allowed_cidrs", &entries);
        let err = v.finish(|| ()).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["allowed_cidrs[1]", "allowed_cidrs[2]"]);
        let mut v = Validator::new();
        allowed_networks(&mut v, "allowed_cidrs", &vec!["10.0.0.1".to_owned(); 65]);
        assert!(!v.is_ok());
    }

    #[test]
    fn lists_are_sorted_and_deduplicated() {
        let l = list(&["192.0.2.0/24", "10.0.0.0/8", "10.0.0.0/8"]);
        assert_eq!(l.to_strings(), ["10.0.0.0/8", "192.0.2.0/24"]);
        assert_eq!(AllowedNetworks::from_stored(&l.to_strings()).unwrap(), l);
    }

    #[test]
    fn within_a_parent_list() {
        let parent = list(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(list(&["10.1.0.0/16"]).within(&parent));
        assert!(list(&["10.1.0.0/16", "2001:db8:5::/48"]).within(&parent));
        assert!(parent.within(&parent));
        assert!(!list(&["10.0.0.0/7"]).within(&parent));
        assert!(!list(&["192.0.2.1"]).within(&parent));
        assert!(!AllowedNetworks::default().within(&parent));
        assert!(list(&["192.0.2.1"]).within(&AllowedNetworks::default()));
    }
}
