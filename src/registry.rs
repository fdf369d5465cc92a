//! Orgs and their connectors as the request path sees them, built from a validated config.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::credentials::Credentials;
use crate::secret::Secret;
use crate::target::ResourceDomain;

#[derive(Debug)]
pub struct Registry {
    orgs: HashMap<String, Org>,
}

#[derive(Debug)]
pub struct Org {
    pub name: String,
    pub inbound_token: Option<Secret>,
    connectors: HashMap<String, Arc<Connector>>,
}

#[derive(Debug)]
pub struct Connector {
    pub org: String,
    pub name: String,
    pub auth_kind: &'static str,
    pub resource_domain: ResourceDomain,
    pub credentials: Credentials,
}

impl Registry {
    pub fn new(config: &Config) -> Self {
        let orgs = config
            .orgs
            .values()
            .map(|org| {
                let connectors = org
                    .connectors
                    .values()
                    .map(|c| {
                        let connector = Connector {
                            org: c.org.clone(),
                            name: c.name.clone(),
                            auth_kind: c.auth.kind(),
                            resource_domain: c.resource_domain.clone(),
                            credentials: Credentials::new(&c.auth),
                        };
                        (c.name.clone(), Arc::new(connector))
                    })
                    .collect();
                let org = Org {
                    name: org.name.clone(),
                    inbound_token: org.inbound_token.clone(),
                    connectors,
                };
                (org.name.clone(), org)
            })
            .collect();
        Self { orgs }
    }

    pub fn org(&self, name: &str) -> Option<&Org> {
        self.orgs.get(name)
    }

    /// The org to use when a request names none: only when there is exactly one.
    pub fn only_org(&self) -> Option<&Org> {
        if self.orgs.len() == 1 {
            self.orgs.values().next()
        } else {
            None
        }
    }
}

impl Org {
    pub fn connector(&self, name: &str) -> Option<&Arc<Connector>> {
        self.connectors.get(name)
    }
}
