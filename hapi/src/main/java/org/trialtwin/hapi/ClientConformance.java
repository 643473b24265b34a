package org.trialtwin.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.MethodOutcome;
import ca.uhn.fhir.rest.client.api.IClientInterceptor;
import ca.uhn.fhir.rest.client.api.IGenericClient;
import ca.uhn.fhir.rest.client.api.IHttpRequest;
import ca.uhn.fhir.rest.client.api.IHttpResponse;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Enumerations.AdministrativeGender;
import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.Observation;
import org.hl7.fhir.r4.model.Patient;

/**
 * HAPI FHIR's own generic client (the one Java EDC and EHR integrations use) against a FHIR server:
 * conditional create, history paging and a typed chained search, exactly as the client emits them.
 *
 * <p>Run from the repackaged jar: {@code java -cp trialtwin-hapi.jar
 * -Dloader.main=org.trialtwin.hapi.ClientConformance org.springframework.boot.loader.launch.PropertiesLauncher
 * BASE_URL TAG}. It prints one JSON object of what the server answered (and what the client sent) for the
 * calling test to judge; any exception is a non-zero exit.
 */
public final class ClientConformance {

    private ClientConformance() {
    }

    public static void main(String[] args) {
        String base = args[0];
        String tag = args[1];
        FhirContext ctx = FhirContext.forR4();
        ctx.getRestfulClientFactory().setSocketTimeout(120_000);
        IGenericClient client = ctx.newRestfulGenericClient(base);
        client.setEncoding(EncodingEnum.JSON);
        List<String> sent = new ArrayList<>();
        client.registerInterceptor(new IClientInterceptor() {
            @Override
            public void interceptRequest(IHttpRequest request) {
                Map<String, List<String>> headers = request.getAllHeaders();
                List<String> ifNoneExist = headers.getOrDefault("If-None-Exist", List.of());
                sent.add(request.getHttpVerbName() + " " + request.getUri()
                        + (ifNoneExist.isEmpty() ? "" : " If-None-Exist: " + ifNoneExist.get(0)));
            }

            @Override
            public void interceptResponse(IHttpResponse response) {
            }
        });
        Map<String, Object> out = new LinkedHashMap<>();

        // 1. Conditional create, twice: the second must find the first, not create a twin.
        String system = "urn:trialtwin:hapi-client";
        Patient patient = new Patient();
        patient.addIdentifier().setSystem(system).setValue(tag);
        patient.setGender(AdministrativeGender.FEMALE);
        MethodOutcome first = client.create().resource(patient).conditional()
                .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(system, tag)).execute();
        MethodOutcome second = client.create().resource(patient).conditional()
                .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(system, tag)).execute();
        String pid = first.getId().getIdPart();
        out.put("conditional_first_created", Boolean.TRUE.equals(first.getCreated()));
        out.put("conditional_second_created", Boolean.TRUE.equals(second.getCreated()));
        out.put("conditional_same_id", pid.equals(second.getId().getIdPart()));
        Bundle same = client.search().forResource(Patient.class)
                .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(system, tag))
                .returnBundle(Bundle.class).execute();
        out.put("conditional_matches", same.getTotal());

        // 2. History: seven updates make eight versions; read them five at a time.
        Patient current = client.read().resource(Patient.class).withId(pid).execute();
        AdministrativeGender[] genders = {AdministrativeGender.MALE, AdministrativeGender.OTHER,
            AdministrativeGender.UNKNOWN, AdministrativeGender.FEMALE, AdministrativeGender.MALE,
            AdministrativeGender.OTHER, AdministrativeGender.FEMALE};
        for (AdministrativeGender gender : genders) {
            current.setGender(gender);
            // a versionless id: no If-Match (the client would send the version it read first)
            current.setId(new IdType("Patient", pid));
            client.update().resource(current).execute();
        }
        out.put("instance_history", pages(client, client.history().onInstance(new IdType("Patient", pid))
                .returnBundle(Bundle.class).count(5).execute()));
        out.put("type_history", pages(client, client.history().onType(Patient.class)
                .returnBundle(Bundle.class).count(5).execute()));
        out.put("system_history", pages(client, client.history().onServer()
                .returnBundle(Bundle.class).count(5).execute()));

        // 3. A typed chain, as HAPI's client (and fhirpy) spell it: subject:Patient.gender=female.
        Patient male = new Patient();
        male.addIdentifier().setSystem(system).setValue(tag + "-m");
        male.setGender(AdministrativeGender.MALE);
        String mid = client.create().resource(male).execute().getId().getIdPart();
        for (String subject : new String[] {pid, pid, mid}) {
            Observation obs = new Observation();
            obs.setStatus(Observation.ObservationStatus.FINAL);
            obs.getCode().setText("hapi-client " + tag);
            obs.getSubject().setReference("Patient/" + subject);
            client.create().resource(obs).execute();
        }
        Bundle chained = client.search().forResource(Observation.class)
                .where(Observation.SUBJECT.hasChainedProperty("Patient", Patient.GENDER.exactly().code("female")))
                .returnBundle(Bundle.class).execute();
        out.put("chained_total", chained.getTotal());
        out.put("chained_entries", chained.getEntry().size());
        out.put("requests", sent);
        System.out.println(json(out));
    }

    /** Follow next links from a first page; report every page's total and size, and the distinct versions. */
    private static Map<String, Object> pages(IGenericClient client, Bundle page) {
        List<Integer> totals = new ArrayList<>();
        List<Integer> sizes = new ArrayList<>();
        List<String> versions = new ArrayList<>();
        while (true) {
            totals.add(page.getTotal());
            sizes.add(page.getEntry().size());
            for (Bundle.BundleEntryComponent entry : page.getEntry()) {
                versions.add(entry.getFullUrl() + "|" + entry.getResponse().getEtag());
            }
            if (page.getLink(Bundle.LINK_NEXT) == null || sizes.size() > 200) {
                break;
            }
            page = client.loadPage().next(page).execute();
        }
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("totals", totals);
        out.put("sizes", sizes);
        out.put("distinct", versions.stream().distinct().count());
        return out;
    }

    private static String json(Object value) {
        if (value instanceof Map<?, ?> map) {
            List<String> parts = new ArrayList<>();
            map.forEach((k, v) -> parts.add(json(k.toString()) + ":" + json(v)));
            return "{" + String.join(",", parts) + "}";
        }
        if (value instanceof List<?> list) {
            List<String> parts = new ArrayList<>();
            list.forEach(v -> parts.add(json(v)));
            return "[" + String.join(",", parts) + "]";
        }
        if (value instanceof String s) {
            return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
        }
        return String.valueOf(value);
    }
}
