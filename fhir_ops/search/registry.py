"""The registry of search parameters the embedded store indexes, one entry per (resource type, name).

It is the single source for what search understands and for the CapabilityStatement's searchParam lists.
"""
from __future__ import annotations

from dataclasses import dataclass

SEARCH_TYPES = ("token", "reference", "date", "string", "quantity", "number", "uri")


@dataclass(frozen=True)
class SearchParamDef:
    """One search parameter.

    Attributes
    ----------
    name : str
        Name on the wire (``subject``, ``birthdate``, ``_lastUpdated``).
    type : str
        FHIR search type: one of ``SEARCH_TYPES``.
    paths : tuple of str
        Dotted element paths (choice types spelled out: ``effectiveDateTime``) from which index
        values are extracted; lists are walked transparently.
    targets : tuple of str
        For references: resource types the reference may point to (empty = any type). Values
        pointing elsewhere are not indexed under this parameter, which is how ``patient`` narrows
        ``subject``.
    documentation : str
        What the parameter searches, for the CapabilityStatement.
    """

    name: str
    type: str
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    documentation: str = ""


def _p(name: str, type_: str, paths: str, doc: str, targets: str = "") -> SearchParamDef:
    if type_ not in SEARCH_TYPES:
        raise ValueError(f"unknown search type {type_!r}")
    return SearchParamDef(name, type_, tuple(p.strip() for p in paths.split("|")),
                          tuple(t.strip() for t in targets.split(",") if t.strip()), doc)


#: parameters every type has; ``_id`` and ``_lastUpdated`` are answered from the resource table itself
COMMON = (
    _p("_id", "token", "id", "Logical id of the resource"),
    _p("_lastUpdated", "date", "meta.lastUpdated", "When the resource version was stored"),
    _p("_tag", "token", "meta.tag", "Tags applied to the resource"),
    _p("_profile", "uri", "meta.profile", "Profiles the resource claims to conform to"),
    _p("_security", "token", "meta.security", "Security labels applied to the resource"),
)

_SUBJ = "Patient,Group"
_ANY = ""


def _conformance(extra: tuple = ()) -> tuple:
    """The search parameters shared by canonical (conformance) resources."""
    return (
        _p("url", "uri", "url", "Canonical URL of the artifact"),
        _p("version", "token", "version", "Business version of the artifact"),
        _p("name", "string", "name", "Computationally friendly name"),
        _p("title", "string", "title", "Human-friendly name"),
        _p("status", "token", "status", "draft | active | retired | unknown"),
        _p("date", "date", "date", "Date last changed"),
        _p("publisher", "string", "publisher", "Name of the publisher"),
        _p("description", "string", "description", "Natural language description"),
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("jurisdiction", "token", "jurisdiction", "Intended jurisdiction"),
        *extra,
    )


_REGISTRY: dict[str, tuple[SearchParamDef, ...]] = {
    "Patient": (
        _p("identifier", "token", "identifier", "A patient identifier"),
        _p("name", "string", "name", "Any part of a name (family, given, prefix, suffix, text)"),
        _p("family", "string", "name.family", "Family name"),
        _p("given", "string", "name.given", "Given name"),
        _p("birthdate", "date", "birthDate", "Date of birth"),
        _p("gender", "token", "gender", "Administrative gender"),
        _p("active", "token", "active", "Whether the record is active"),
        _p("address", "string", "address", "Any part of an address"),
        _p("address-city", "string", "address.city", "City of an address"),
        _p("address-postalcode", "string", "address.postalCode", "Postal code of an address"),
        _p("telecom", "token", "telecom", "Phone, email or other contact value"),
        _p("death-date", "date", "deceasedDateTime", "Date of death"),
        _p("general-practitioner", "reference", "generalPractitioner", "Nominated primary care provider",
           "Practitioner,Organization,PractitionerRole"),
        _p("organization", "reference", "managingOrganization", "Custodian organization", "Organization"),
        _p("link", "reference", "link.other", "Linked patient or related person", "Patient,RelatedPerson"),
    ),
    "PractitionerRole": (
        # site-level access (fhir_ops.auth): a user's roles are found by practitioner
        _p("practitioner", "reference", "practitioner", "Practitioner that is able to provide the defined services",
           "Practitioner"),
        _p("organization", "reference", "organization", "The organization where the roles are available",
           "Organization"),
        _p("location", "reference", "location", "One of the locations at which this role provides care", "Location"),
        _p("role", "token", "code", "The practitioner can perform this role for the organization"),
        _p("active", "token", "active", "Whether this practitioner role record is in active use"),
        _p("identifier", "token", "identifier", "A practitioner role's identifier"),
    ),
    "Practitioner": (
        _p("identifier", "token", "identifier", "A practitioner identifier"),
        _p("name", "string", "name", "Any part of a name"),
        _p("family", "string", "name.family", "Family name"),
        _p("given", "string", "name.given", "Given name"),
        _p("active", "token", "active", "Whether the record is active"),
        _p("telecom", "token", "telecom", "Contact value"),
    ),
    "Observation": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("code", "token", "code", "The code of the observation (LOINC ...)"),
        _p("category", "token", "category", "Classification of the observation"),
        _p("status", "token", "status", "registered | preliminary | final | amended ..."),
        _p("subject", "reference", "subject", "Who or what the observation is about",
           "Patient,Group,Device,Location"),
        _p("patient", "reference", "subject", "The patient the observation is about", "Patient"),
        _p("encounter", "reference", "encounter", "Encounter of the observation", "Encounter"),
        _p("date", "date", "effectiveDateTime | effectivePeriod | effectiveInstant",
           "Clinically relevant time or period"),
        _p("value-quantity", "quantity", "valueQuantity", "Quantity value"),
        _p("value-concept", "token", "valueCodeableConcept", "Coded value"),
        _p("value-string", "string", "valueString", "String value"),
        _p("component-code", "token", "component.code", "Component code"),
        _p("component-value-quantity", "quantity", "component.valueQuantity", "Component quantity value"),
        _p("method", "token", "method", "How the observation was made"),
        _p("data-absent-reason", "token", "dataAbsentReason", "Why the value is missing"),
        _p("based-on", "reference", "basedOn", "Plan or request fulfilled",
           "CarePlan,DeviceRequest,ImmunizationRecommendation,MedicationRequest,NutritionOrder,ServiceRequest"),
        _p("part-of", "reference", "partOf", "Larger event this is part of", _ANY),
        _p("derived-from", "reference", "derivedFrom", "Resources the value was derived from", _ANY),
        _p("has-member", "reference", "hasMember", "Related member observations",
           "Observation,QuestionnaireResponse,MolecularSequence"),
        _p("focus", "reference", "focus", "What the observation is about when not the subject", _ANY),
        _p("performer", "reference", "performer", "Who performed the observation",
           "Practitioner,PractitionerRole,Organization,CareTeam,Patient,RelatedPerson"),
        _p("device", "reference", "device", "Measurement device", "Device,DeviceMetric"),
    ),
    "MedicationAdministration": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("code", "token", "medicationCodeableConcept", "Code of the administered medication"),
        _p("medication", "reference", "medicationReference", "Administered medication", "Medication"),
        _p("status", "token", "status", "in-progress | completed | not-done ..."),
        _p("subject", "reference", "subject", "Who received the medication", _SUBJ),
        _p("patient", "reference", "subject", "The patient who received the medication", "Patient"),
        _p("context", "reference", "context", "Encounter or episode of care", "Encounter,EpisodeOfCare"),
        _p("effective-time", "date", "effectiveDateTime | effectivePeriod", "When the medication was given"),
        _p("performer", "reference", "performer.actor", "Who administered",
           "Practitioner,PractitionerRole,Patient,RelatedPerson,Device"),
        _p("request", "reference", "request", "The originating request", "MedicationRequest"),
        _p("device", "reference", "device", "Device used", "Device"),
        _p("reason-given", "token", "reasonCode", "Reason the medication was given"),
    ),
    "ResearchStudy": (
        _p("identifier", "token", "identifier", "Business identifier (study number)"),
        _p("title", "string", "title", "Name of the study"),
        _p("status", "token", "status", "active | completed | withdrawn ..."),
        _p("category", "token", "category", "Classification of the study"),
        _p("focus", "token", "focus", "Drugs, devices or conditions studied"),
        _p("keyword", "token", "keyword", "Keywords"),
        _p("condition", "token", "condition", "Condition studied"),
        _p("date", "date", "period", "When the study runs"),
        _p("sponsor", "reference", "sponsor", "Sponsoring organization", "Organization"),
        _p("principalinvestigator", "reference", "principalInvestigator", "Principal investigator",
           "Practitioner,PractitionerRole"),
        _p("site", "reference", "site", "Facility where the study runs", "Location"),
        _p("partof", "reference", "partOf", "Larger study", "ResearchStudy"),
        _p("protocol", "reference", "protocol", "Steps followed", "PlanDefinition"),
        _p("location", "token", "location", "Geographic region of the study"),
    ),
    "ResearchSubject": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "candidate | on-study | withdrawn ..."),
        _p("study", "reference", "study", "Study the subject is enrolled in", "ResearchStudy"),
        _p("individual", "reference", "individual", "Who is enrolled", "Patient"),
        _p("patient", "reference", "individual", "Who is enrolled", "Patient"),
        _p("date", "date", "period", "Period of participation"),
        _p("arm", "string", "assignedArm", "Assigned arm (TrialTwin addition)"),
    ),
    "RiskAssessment": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "registered | preliminary | final ... (TrialTwin addition)"),
        _p("subject", "reference", "subject", "Who the assessment is about", _SUBJ),
        _p("patient", "reference", "subject", "The patient the assessment is about", "Patient"),
        _p("encounter", "reference", "encounter", "Encounter of the assessment", "Encounter"),
        _p("date", "date", "occurrenceDateTime | occurrencePeriod", "When the assessment was made"),
        _p("method", "token", "method", "Evaluation mechanism"),
        _p("code", "token", "code", "Type of assessment (TrialTwin addition)"),
        _p("condition", "reference", "condition", "Condition assessed", "Condition"),
        _p("performer", "reference", "performer", "Who did the assessment",
           "Practitioner,PractitionerRole,Device"),
        _p("probability", "number", "prediction.probabilityDecimal", "Likelihood of the outcome"),
        _p("risk", "token", "prediction.qualitativeRisk", "Likelihood as a code"),
        _p("outcome", "token", "prediction.outcome", "Predicted outcome (TrialTwin addition)"),
        _p("basis", "reference", "basis", "Information used (TrialTwin addition)", _ANY),
    ),
    "Task": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "requested | accepted | completed ..."),
        _p("business-status", "token", "businessStatus", "Business-specific status"),
        _p("intent", "token", "intent", "proposal | plan | order ..."),
        _p("priority", "token", "priority", "routine | urgent | asap | stat"),
        _p("code", "token", "code", "Task type"),
        _p("subject", "reference", "for", "Beneficiary of the task", _ANY),
        _p("patient", "reference", "for", "Patient the task is for", "Patient"),
        _p("focus", "reference", "focus", "What the task acts on", _ANY),
        _p("owner", "reference", "owner", "Responsible individual",
           "Practitioner,PractitionerRole,Organization,CareTeam,HealthcareService,Patient,Device,RelatedPerson"),
        _p("requester", "reference", "requester", "Who asked for the task",
           "Device,Organization,Patient,Practitioner,PractitionerRole,RelatedPerson"),
        _p("encounter", "reference", "encounter", "Encounter of the task", "Encounter"),
        _p("based-on", "reference", "basedOn", "Request fulfilled", _ANY),
        _p("part-of", "reference", "partOf", "Composite task", "Task"),
        _p("authored-on", "date", "authoredOn", "Creation date"),
        _p("modified", "date", "lastModified", "Last modification date"),
        _p("period", "date", "executionPeriod", "Start and end of execution"),
        _p("performer", "token", "performerType", "Requested performer type"),
        _p("group-identifier", "token", "groupIdentifier", "Requisition id"),
    ),
    "CarePlan": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "draft | active | completed ..."),
        _p("intent", "token", "intent", "proposal | plan | order | option"),
        _p("category", "token", "category", "Type of plan"),
        _p("subject", "reference", "subject", "Who the plan is for", _SUBJ),
        _p("patient", "reference", "subject", "Patient the plan is for", "Patient"),
        _p("encounter", "reference", "encounter", "Encounter of creation", "Encounter"),
        _p("date", "date", "period", "Time period the plan covers"),
        _p("activity-code", "token", "activity.detail.code", "Planned activity"),
        _p("activity-date", "date", "activity.detail.scheduledPeriod | activity.detail.scheduledTiming.event",
           "When an activity is scheduled"),
        _p("activity-reference", "reference", "activity.reference", "Activity detailed elsewhere",
           "Appointment,CommunicationRequest,DeviceRequest,MedicationRequest,NutritionOrder,Task,ServiceRequest,"
           "VisionPrescription,RequestGroup"),
        _p("performer", "reference", "activity.detail.performer", "Who performs an activity", _ANY),
        _p("based-on", "reference", "basedOn", "Fulfils plan", "CarePlan"),
        _p("part-of", "reference", "partOf", "Part of referenced plan", "CarePlan"),
        _p("care-team", "reference", "careTeam", "Who is involved", "CareTeam"),
        _p("condition", "reference", "addresses", "Problems addressed", "Condition"),
        _p("goal", "reference", "goal", "Desired outcome", "Goal"),
        _p("instantiates-canonical", "uri", "instantiatesCanonical", "Protocol or definition"),
    ),
    "Appointment": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "proposed | booked | fulfilled | noshow ..."),
        _p("date", "date", "start", "Start of the appointment"),
        _p("actor", "reference", "participant.actor", "Any participant", _ANY),
        _p("patient", "reference", "participant.actor", "Participating patient", "Patient"),
        _p("practitioner", "reference", "participant.actor", "Participating practitioner", "Practitioner"),
        _p("location", "reference", "participant.actor", "Location of the appointment", "Location"),
        _p("part-status", "token", "participant.status", "Participation status"),
        _p("service-type", "token", "serviceType", "Service (TrialTwin: in-person | virtual modality)"),
        _p("service-category", "token", "serviceCategory", "Broad category of service"),
        _p("appointment-type", "token", "appointmentType", "Style of appointment"),
        _p("specialty", "token", "specialty", "Specialty required"),
        _p("reason-code", "token", "reasonCode", "Coded reason"),
        _p("reason-reference", "reference", "reasonReference", "Reason as a resource",
           "Condition,Procedure,Observation,ImmunizationRecommendation"),
        _p("based-on", "reference", "basedOn", "Originating request", "ServiceRequest"),
        _p("slot", "reference", "slot", "Booked slots", "Slot"),
        _p("supporting-info", "reference", "supportingInformation", "Additional information", _ANY),
    ),
    "Group": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("name", "string", "name", "Label of the group (TrialTwin addition)"),
        _p("type", "token", "type", "person | animal | practitioner | device | medication | substance"),
        _p("actual", "token", "actual", "Whether the group lists actual members"),
        _p("code", "token", "code", "Kind of members"),
        _p("member", "reference", "member.entity", "A member of the group",
           "Patient,Practitioner,PractitionerRole,Device,Medication,Substance,Group"),
        _p("characteristic", "token", "characteristic.code", "Kind of characteristic"),
        _p("value", "token", "characteristic.valueCodeableConcept", "Value of a coded characteristic"),
        _p("exclude", "token", "characteristic.exclude", "Whether a characteristic excludes"),
        _p("managing-entity", "reference", "managingEntity", "Who maintains the group",
           "Organization,RelatedPerson,Practitioner,PractitionerRole"),
    ),
    "Provenance": (
        _p("target", "reference", "target", "Resource the provenance is about", _ANY),
        _p("patient", "reference", "target", "Patient resource the provenance is about", "Patient"),
        _p("recorded", "date", "recorded", "When the activity was recorded"),
        _p("when", "date", "occurredDateTime | occurredPeriod", "When the activity occurred"),
        _p("agent", "reference", "agent.who", "Who participated", _ANY),
        _p("agent-type", "token", "agent.type", "How the agent participated"),
        _p("agent-role", "token", "agent.role", "What the agent's role was"),
        _p("entity", "reference", "entity.what", "Input or output entity", _ANY),
        _p("activity", "token", "activity", "Activity that occurred (TrialTwin addition)"),
        _p("location", "reference", "location", "Where the activity occurred", "Location"),
        _p("signature-type", "token", "signature.type", "Signature indication"),
        _p("policy", "uri", "policy", "Policy or plan the activity was defined by (TrialTwin addition)"),
    ),
    "AuditEvent": (
        _p("type", "token", "type", "Type of event"),
        _p("subtype", "token", "subtype", "More specific type"),
        _p("action", "token", "action", "C | R | U | D | E"),
        _p("outcome", "token", "outcome", "0 | 4 | 8 | 12"),
        _p("date", "date", "recorded", "When the event was recorded"),
        _p("agent", "reference", "agent.who", "Who participated", _ANY),
        _p("agent-name", "string", "agent.name", "Human-readable name of an agent"),
        _p("agent-role", "token", "agent.role", "Agent role in the event"),
        _p("altid", "token", "agent.altId", "Alternative user id"),
        _p("address", "string", "agent.network.address", "Network address of an agent"),
        _p("policy", "uri", "agent.policy", "Policy that authorized the event"),
        _p("entity", "reference", "entity.what", "Specific instance of a resource", _ANY),
        _p("entity-name", "string", "entity.name", "Descriptor of an entity"),
        _p("entity-type", "token", "entity.type", "Type of entity involved"),
        _p("entity-role", "token", "entity.role", "What role the entity played"),
        _p("patient", "reference", "agent.who | entity.what", "Patient involved", "Patient"),
        _p("site", "token", "source.site", "Logical source location within the enterprise"),
        _p("source", "reference", "source.observer", "The identity of the source detecting the event", _ANY),
    ),
    "ConceptMap": _conformance((
        _p("source-uri", "uri", "sourceUri | sourceCanonical", "The source value set"),
        _p("target-uri", "uri", "targetUri | targetCanonical", "The target value set"),
        _p("source-system", "uri", "group.source", "Source system of the mappings"),
        _p("target-system", "uri", "group.target", "Target system of the mappings"),
        _p("source-code", "token", "group.element.code", "A mapped source code"),
        _p("target-code", "token", "group.element.target.code", "A target code"),
        _p("dependson", "uri", "group.element.target.dependsOn.property", "Reference to a property value"),
    )),
    "Library": _conformance((
        _p("type", "token", "type", "logic-library | model-definition | asset-collection | module-definition"),
        _p("content-type", "token", "content.contentType", "The type of content in the Library"),
    )),
    "Encounter": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "planned | arrived | in-progress | finished ..."),
        _p("class", "token", "class", "Classification (ambulatory, virtual ...)"),
        _p("type", "token", "type", "Specific type of encounter"),
        _p("subject", "reference", "subject", "Patient or group present", _SUBJ),
        _p("patient", "reference", "subject", "The patient present", "Patient"),
        _p("date", "date", "period", "When the encounter took place"),
        _p("participant", "reference", "participant.individual", "Persons involved",
           "Practitioner,PractitionerRole,RelatedPerson"),
        _p("practitioner", "reference", "participant.individual", "Practitioner involved", "Practitioner"),
        _p("service-provider", "reference", "serviceProvider", "Responsible organization", "Organization"),
        _p("location", "reference", "location.location", "Where the encounter took place", "Location"),
        _p("appointment", "reference", "appointment", "Appointment that scheduled it", "Appointment"),
        _p("based-on", "reference", "basedOn", "Originating request", "ServiceRequest"),
        _p("episode-of-care", "reference", "episodeOfCare", "Episode of care", "EpisodeOfCare"),
        _p("part-of", "reference", "partOf", "Larger encounter", "Encounter"),
        _p("diagnosis", "reference", "diagnosis.condition", "Diagnosis", "Condition,Procedure"),
        _p("reason-code", "token", "reasonCode", "Coded reason"),
        _p("length", "quantity", "length", "Length of the encounter"),
    ),
    "AdverseEvent": (
        _p("identifier", "token", "identifier", "Business identifier (TrialTwin addition)"),
        _p("actuality", "token", "actuality", "actual | potential"),
        _p("category", "token", "category", "Category of the event"),
        _p("event", "token", "event", "Type of the event"),
        _p("date", "date", "date", "When the event occurred"),
        _p("subject", "reference", "subject", "Subject impacted",
           "Patient,Group,Practitioner,RelatedPerson"),
        _p("patient", "reference", "subject", "Patient impacted (TrialTwin addition)", "Patient"),
        _p("seriousness", "token", "seriousness", "Seriousness of the event"),
        _p("severity", "token", "severity", "mild | moderate | severe"),
        _p("study", "reference", "study", "Research study", "ResearchStudy"),
        _p("location", "reference", "location", "Location where it occurred", "Location"),
        _p("recorder", "reference", "recorder", "Who recorded it",
           "Patient,Practitioner,PractitionerRole,RelatedPerson"),
        _p("resultingcondition", "reference", "resultingCondition", "Effect on the subject", "Condition"),
        _p("substance", "reference", "suspectEntity.instance", "Suspected entity", _ANY),
    ),
    "Organization": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("name", "string", "name | alias", "Name or alias"),
        _p("active", "token", "active", "Whether the organization is active"),
        _p("type", "token", "type", "Kind of organization"),
        _p("address", "string", "address", "Any part of an address"),
        _p("address-city", "string", "address.city", "City"),
        _p("address-country", "string", "address.country", "Country"),
        _p("partof", "reference", "partOf", "Parent organization", "Organization"),
        _p("endpoint", "reference", "endpoint", "Technical endpoints", "Endpoint"),
    ),
    "Location": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("name", "string", "name | alias", "Name or alias"),
        _p("status", "token", "status", "active | suspended | inactive"),
        _p("operational-status", "token", "operationalStatus", "Operational status"),
        _p("type", "token", "type", "Kind of location"),
        _p("address", "string", "address", "Any part of the address"),
        _p("address-city", "string", "address.city", "City"),
        _p("address-country", "string", "address.country", "Country"),
        _p("organization", "reference", "managingOrganization", "Managing organization", "Organization"),
        _p("partof", "reference", "partOf", "Larger location", "Location"),
        _p("endpoint", "reference", "endpoint", "Technical endpoints", "Endpoint"),
    ),
    "Device": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("device-name", "string", "deviceName.name", "Name of the device"),
        _p("manufacturer", "string", "manufacturer", "Manufacturer"),
        _p("model", "string", "modelNumber", "Model number"),
        _p("status", "token", "status", "active | inactive | entered-in-error | unknown"),
        _p("type", "token", "type", "Kind of device"),
        _p("udi-di", "string", "udiCarrier.deviceIdentifier", "UDI device identifier"),
        _p("url", "uri", "url", "Network address of the device"),
        _p("patient", "reference", "patient", "Patient the device is affixed to", "Patient"),
        _p("organization", "reference", "owner", "Owning organization", "Organization"),
        _p("location", "reference", "location", "Where the device is", "Location"),
    ),
    "Condition": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("code", "token", "code", "Code of the condition"),
        _p("clinical-status", "token", "clinicalStatus", "active | recurrence | remission | resolved ..."),
        _p("verification-status", "token", "verificationStatus", "confirmed | provisional ..."),
        _p("category", "token", "category", "Category of the condition"),
        _p("severity", "token", "severity", "Severity"),
        _p("body-site", "token", "bodySite", "Anatomical location"),
        _p("evidence", "token", "evidence.code", "Manifestation or symptom"),
        _p("stage", "token", "stage.summary", "Stage summary"),
        _p("subject", "reference", "subject", "Who has the condition", _SUBJ),
        _p("patient", "reference", "subject", "Patient who has the condition", "Patient"),
        _p("encounter", "reference", "encounter", "Encounter of assertion", "Encounter"),
        _p("asserter", "reference", "asserter", "Who asserted it",
           "Practitioner,PractitionerRole,Patient,RelatedPerson"),
        _p("onset-date", "date", "onsetDateTime | onsetPeriod", "Date of onset"),
        _p("abatement-date", "date", "abatementDateTime | abatementPeriod", "Date of abatement"),
        _p("recorded-date", "date", "recordedDate", "Date recorded"),
    ),
    "Medication": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("code", "token", "code", "Code of the medication"),
        _p("status", "token", "status", "active | inactive | entered-in-error"),
        _p("form", "token", "form", "Dose form"),
    ),
    "CodeSystem": _conformance((
        _p("code", "token", "concept.code", "A code defined in the system"),
        _p("system", "uri", "url", "Canonical URL of the system"),
        _p("content-mode", "token", "content", "not-present | example | fragment | complete | supplement"),
        _p("supplements", "uri", "supplements", "Code system this supplements"),
    )),
    "ValueSet": _conformance((
        _p("code", "token", "expansion.contains.code", "A code in the expansion"),
        _p("reference", "uri", "compose.include.system", "A code system included"),
        _p("expansion", "uri", "expansion.identifier", "Identifier of the expansion"),
    )),
    "StructureDefinition": _conformance((
        _p("type", "uri", "type", "Type defined or constrained"),
        _p("kind", "token", "kind", "primitive-type | complex-type | resource | logical"),
        _p("abstract", "token", "abstract", "Whether the structure is abstract"),
        _p("base", "uri", "baseDefinition", "Definition this derives from"),
        _p("derivation", "token", "derivation", "specialization | constraint"),
        _p("experimental", "token", "experimental", "For testing purposes"),
        _p("path", "token", "snapshot.element.path | differential.element.path", "An element path"),
    )),
    "OperationDefinition": _conformance((
        _p("code", "token", "code", "Name used to invoke the operation"),
        _p("kind", "token", "kind", "operation | query"),
        _p("system", "token", "system", "Invoke at the system level"),
        _p("type", "token", "type", "Invoke at the type level"),
        _p("instance", "token", "instance", "Invoke on an instance"),
        _p("base", "uri", "base", "Operation this derives from"),
        _p("input-profile", "uri", "inputProfile", "Validation information for in parameters"),
        _p("output-profile", "uri", "outputProfile", "Validation information for out parameters"),
    )),
    "SearchParameter": _conformance((
        _p("code", "token", "code", "Name used in the URL"),
        _p("base", "token", "base", "Resource types the parameter applies to"),
        _p("type", "token", "type", "number | date | string | token | reference ..."),
    )),
    "CommunicationRequest": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "draft | active | completed ..."),
        _p("category", "token", "category", "Message category"),
        _p("priority", "token", "priority", "routine | urgent | asap | stat"),
        _p("medium", "token", "medium", "Channel of communication"),
        _p("subject", "reference", "subject", "Focus of the message", _SUBJ),
        _p("patient", "reference", "subject", "Patient the message is about", "Patient"),
        _p("encounter", "reference", "encounter", "Encounter of creation", "Encounter"),
        _p("recipient", "reference", "recipient", "Message recipient", _ANY),
        _p("sender", "reference", "sender", "Message sender", _ANY),
        _p("requester", "reference", "requester", "Who asks for the communication", _ANY),
        _p("about", "reference", "about", "Resources that pertain to the communication", _ANY),
        _p("based-on", "reference", "basedOn", "Fulfils plan or proposal", _ANY),
        _p("replaces", "reference", "replaces", "Request(s) replaced", "CommunicationRequest"),
        _p("authored", "date", "authoredOn", "When the request was created"),
        _p("occurrence", "date", "occurrenceDateTime | occurrencePeriod", "When the communication is scheduled"),
        _p("group-identifier", "token", "groupIdentifier", "Composite request identifier"),
    ),
    "Parameters": (),
    "Bundle": (
        _p("identifier", "token", "identifier", "Persistent identifier of the bundle"),
        _p("type", "token", "type", "document | message | transaction ..."),
        _p("timestamp", "date", "timestamp", "When the bundle was assembled"),
    ),
    "Questionnaire": _conformance((
        _p("code", "token", "item.code", "A question code"),
    )),
    "QuestionnaireResponse": (
        _p("identifier", "token", "identifier", "Business identifier"),
        _p("status", "token", "status", "in-progress | completed ..."),
        _p("questionnaire", "uri", "questionnaire", "Form being answered"),
        _p("subject", "reference", "subject", "Subject of the answers", _ANY),
        _p("patient", "reference", "subject", "Patient the answers are about", "Patient"),
        _p("authored", "date", "authored", "When the answers were gathered"),
    ),
}

_BY_NAME: dict[str, dict[str, SearchParamDef]] = {}


def search_parameters_for(resource_type: str) -> list[SearchParamDef]:
    """Return the search parameters of a resource type: its own plus the common ones.

    Types the registry does not list still get the common parameters (``_id``, ``_lastUpdated`` ...).

    Examples
    --------
    >>> [p.name for p in search_parameters_for("ResearchSubject")][:3]
    ['identifier', 'status', 'study']
    >>> "_lastUpdated" in {p.name for p in search_parameters_for("Basic")}
    True
    """
    return [*_REGISTRY.get(resource_type, ()), *COMMON]


def search_parameter(resource_type: str, name: str) -> SearchParamDef | None:
    """Return one parameter definition by wire name, or None when the type has no such parameter."""
    table = _BY_NAME.get(resource_type)
    if table is None:
        table = _BY_NAME[resource_type] = {p.name: p for p in search_parameters_for(resource_type)}
    return table.get(name)


def supported_search_types() -> list[str]:
    """Resource types with type-specific search parameters (every type also has the common ones).

    Examples
    --------
    >>> {"Patient", "Observation", "ConceptMap"} <= set(supported_search_types())
    True
    """
    return sorted(t for t, params in _REGISTRY.items() if params)
